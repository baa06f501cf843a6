/* The edge upgrade (plugins/ws/edge_http.c): RFC 6455 §4.2 request checks,
 * the answers they give, and RFC 7692 §7.1 permessage-deflate negotiation.
 * Heads are copied into exactly-sized heap buffers, so the sanitizer build
 * catches a read past the head. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "edge_http.h"

#define PATH "/Thingworx/WS"
#define KEY  "dGhlIHNhbXBsZSBub25jZQ=="

static const struct edge_pmd_conf PMD = {true, 15, 15};

static char head[16384];

/* A request: request line, then the headers given ("" for none), then the
 * blank line. */
static const char *req(const char *line, const char *headers)
{
    snprintf(head, sizeof(head), "%s\r\n%s\r\n", line, headers);
    return head;
}

static bool tunnels; /* parse with the tunnel paths accepted */

/* The usual upgrade's headers plus `extra`. */
static const char *upgrade(const char *extra)
{
    static char h[12288];

    snprintf(h, sizeof(h),
             "Host: edge.example:443\r\n"
             "Upgrade: websocket\r\n"
             "Connection: Upgrade\r\n"
             "Sec-WebSocket-Key: " KEY "\r\n"
             "Sec-WebSocket-Version: 13\r\n"
             "%s",
             extra);
    return req("GET " PATH " HTTP/1.1", h);
}

static void parse_conf(const char *h, const struct edge_pmd_conf *pmd, struct edge_http_req *r)
{
    size_t n = strlen(h);
    char *copy = malloc(n ? n : 1);
    long hl;

    assert_non_null(copy);
    memcpy(copy, h, n);
    hl = edge_http_head_len(copy, n);
    assert_int_equal(hl, (long)n);
    edge_http_parse(copy, n, PATH, tunnels, pmd, r);
    free(copy);
}

static void parse(const char *h, struct edge_http_req *r)
{
    parse_conf(h, &PMD, r);
}

static int status_of(const char *h)
{
    struct edge_http_req r;

    parse(h, &r);
    if (r.status)
        assert_non_null(r.why);
    return r.status;
}

/* ---- the request ------------------------------------------------------------- */

static void test_accepted(void **state)
{
    struct edge_http_req r;
    char out[512];
    size_t n;

    (void)state;
    parse(upgrade("appKey: secret-key\r\nMax-Frame-Size: 8192\r\n"
                  "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"),
          &r);
    assert_int_equal(r.status, 0);
    /* RFC 6455 §1.3 */
    assert_string_equal(r.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_true(r.has_app_key);
    assert_string_equal(r.app_key, "secret-key");
    assert_int_equal(r.max_frame, 8192);
    assert_true(r.has_xff);
    assert_string_equal(r.xff, "10.0.0.1, 10.0.0.2");
    assert_false(r.pmd.on);
    n = edge_http_101(&r, out, sizeof(out));
    assert_int_equal(n, strlen(out));
    assert_string_equal(out, "HTTP/1.1 101 Switching Protocols\r\n"
                             "Upgrade: websocket\r\n"
                             "Connection: Upgrade\r\n"
                             "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                             "\r\n");
    assert_int_equal(edge_http_101(&r, out, 20), 0);
    /* a query string is ignored; tokens are case-insensitive and listed */
    parse(req("GET " PATH "?x=1 HTTP/1.1", "host: h\r\nupgrade: WebSocket\r\n"
                                           "connection: keep-alive, upgrade\r\n"
                                           "sec-websocket-key: " KEY "\r\n"
                                           "sec-websocket-version: 13\r\n"),
          &r);
    assert_int_equal(r.status, 0);
    assert_string_equal(r.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_false(r.has_app_key);
    assert_false(r.has_xff);
    assert_int_equal(r.max_frame, 0);
    /* whitespace after a value is not part of it (RFC 9110 §5.5) */
    parse(req("GET " PATH " HTTP/1.1", "Host: h \r\nUpgrade: websocket\t\r\n"
                                       "Connection: Upgrade \r\n"
                                       "Sec-WebSocket-Key: " KEY "  \r\n"
                                       "Sec-WebSocket-Version: 13 \r\n"
                                       "appKey: k \r\n"),
          &r);
    assert_int_equal(r.status, 0);
    assert_string_equal(r.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_string_equal(r.app_key, "k");
}

static void test_method(void **state)
{
    char out[256];
    size_t n;

    (void)state;
    assert_int_equal(status_of(req("POST " PATH " HTTP/1.1", "Host: h\r\nUpgrade: websocket\r\n"
                                                             "Connection: Upgrade\r\n")),
                     405);
    assert_int_equal(status_of(req("CONNECT h:443 HTTP/1.1", "Host: h\r\n")), 405);
    assert_int_equal(status_of(req("PUT " PATH " HTTP/1.1", "Host: h\r\n")), 405);
    n = edge_http_refusal(405, out, sizeof(out));
    assert_int_equal(n, strlen(out));
    assert_non_null(strstr(out, "HTTP/1.1 405 Method Not Allowed\r\n"));
    assert_non_null(strstr(out, "\r\nAllow: GET\r\n"));
    assert_non_null(strstr(out, "\r\nConnection: close\r\n\r\n"));
}

static void test_version_of_http(void **state)
{
    static const char *const lines[] = {
        "GET " PATH " HTTP/1.0",
        "GET " PATH " HTTP/2.0",
        "GET " PATH " HTTP/0.9",
        "GET " PATH " HTTP/1.2",
    };

    (void)state;
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        char hdrs[512];

        snprintf(hdrs, sizeof(hdrs),
                 "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n");
        assert_int_equal(status_of(req(lines[i], hdrs)), 400);
    }
    /* no version at all (an HTTP/0.9 request), doubled spaces, garbage */
    assert_int_equal(status_of("GET " PATH "\r\n\r\n"), 400);
    assert_int_equal(status_of(req("GET  " PATH " HTTP/1.1", "Host: h\r\n")), 400);
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1 ", "Host: h\r\n")), 400);
    assert_int_equal(status_of("\x16\x03\x01\x02\x01\r\n\r\n"), 400);
}

static void test_path(void **state)
{
    (void)state;
    assert_int_equal(status_of(req("GET /other HTTP/1.1", "Host: h\r\nUpgrade: websocket\r\n"
                                                          "Connection: Upgrade\r\n"
                                                          "Sec-WebSocket-Key: " KEY "\r\n"
                                                          "Sec-WebSocket-Version: 13\r\n")),
                     404);
    assert_int_equal(status_of(req("GET " PATH "/x HTTP/1.1", "Host: h\r\n")), 404);
    assert_int_equal(status_of(req("GET /Thingworx/W HTTP/1.1", "Host: h\r\n")), 404);
    /* plain HTTP elsewhere: 404; on the served path it is a bad upgrade */
    assert_int_equal(status_of(req("GET / HTTP/1.1", "Host: h\r\n")), 404);
    assert_int_equal(status_of(req("GET /index.html HTTP/1.1", "Host: h\r\n")), 404);
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1", "Host: h\r\n")), 400);
}

static void test_bad_headers(void **state)
{
    static const char *const bad_keys[] = {
        "",
        "dGhlIHNhbXBsZSBub25jZQ",     /* no padding */
        "dGhlIHNhbXBsZSBub25jZQ=",    /* short */
        "dGhlIHNhbXBsZSBub25jZQ===",  /* long */
        "dGhlIHNhbXBsZSBub25jZ!==",   /* not base64 */
        "dGhlIHNhbXBsZSBub25jZXh4eA", /* 19 bytes */
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    };
    char h[512];

    (void)state;
    for (size_t i = 0; i < sizeof(bad_keys) / sizeof(bad_keys[0]); i++) {
        snprintf(h, sizeof(h),
                 "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n",
                 bad_keys[i]);
        assert_int_equal(status_of(req("GET " PATH " HTTP/1.1", h)), 400);
    }
    /* no key */
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1",
                                   "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Version: 13\r\n")),
                     400);
    /* a key twice, even the same one */
    assert_int_equal(status_of(upgrade("Sec-WebSocket-Key: " KEY "\r\n")), 400);
    /* Host missing or twice */
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1",
                                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n")),
                     400);
    assert_int_equal(status_of(upgrade("Host: other\r\n")), 400);
    /* an Upgrade that is not websocket, a Connection without upgrade */
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1",
                                   "Host: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n")),
                     400);
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1",
                                   "Host: h\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n"
                                   "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n")),
                     400);
    /* appKey twice */
    assert_int_equal(status_of(upgrade("appKey: a\r\nappKey: b\r\n")), 400);
}

static void test_ws_version(void **state)
{
    static const char *const versions[] = {"8", "12", "14", "", "13, 8", "013"};
    char out[256];
    size_t n;

    (void)state;
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]); i++) {
        char h[512];

        snprintf(h, sizeof(h),
                 "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: %s\r\n",
                 versions[i]);
        assert_int_equal(status_of(req("GET " PATH " HTTP/1.1", h)), 426);
    }
    /* no version header */
    assert_int_equal(status_of(req("GET " PATH " HTTP/1.1",
                                   "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: " KEY "\r\n")),
                     426);
    n = edge_http_refusal(426, out, sizeof(out));
    assert_int_equal(n, strlen(out));
    assert_non_null(strstr(out, "HTTP/1.1 426 Upgrade Required\r\n"));
    assert_non_null(strstr(out, "\r\nSec-WebSocket-Version: 13\r\n"));
}

static void test_too_long(void **state)
{
    char big[1100], h[1200], *buf;
    struct edge_http_req r;

    (void)state;
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    snprintf(h, sizeof(h), "appKey: %s\r\n", big);
    assert_int_equal(status_of(upgrade(h)), 431);
    snprintf(h, sizeof(h), "X-Forwarded-For: %s\r\n", big);
    assert_int_equal(status_of(upgrade(h)), 431);
    /* extensions may take the whole head: a long list is read, not refused */
    snprintf(h, sizeof(h), "Sec-WebSocket-Extensions: %s\r\n", big);
    assert_int_equal(status_of(upgrade(h)), 0);
    /* a value just under the bound is taken whole */
    big[1023] = '\0';
    snprintf(h, sizeof(h), "appKey: %s\r\n", big);
    parse(upgrade(h), &r);
    assert_int_equal(r.status, 0);
    assert_int_equal(strlen(r.app_key), 1023);
    /* an unknown long header is only bounded by the head */
    snprintf(h, sizeof(h), "X-Whatever: %s\r\n", big);
    assert_int_equal(status_of(upgrade(h)), 0);
    /* request target */
    snprintf(h, sizeof(h), "GET " PATH "?%s HTTP/1.1", big);
    strcpy(big, h);
    assert_int_equal(status_of(req(big, "Host: h\r\n")), 414);

    {
        char out[256];

        assert_true(edge_http_refusal(431, out, sizeof(out)) > 0);
        assert_non_null(strstr(out, "HTTP/1.1 431 "));
        assert_true(edge_http_refusal(400, out, sizeof(out)) > 0);
        assert_true(edge_http_refusal(404, out, sizeof(out)) > 0);
        assert_true(edge_http_refusal(999, out, sizeof(out)) > 0);
        assert_non_null(strstr(out, "HTTP/1.1 503 "));
        assert_int_equal(edge_http_refusal(405, out, 10), 0);
    }

    /* head_len: none yet, one, one at exactly 8 KiB, none in 8 KiB */
    buf = malloc(EDGE_HTTP_MAX_HEAD + 100);
    assert_non_null(buf);
    memcpy(buf, "GET / HTTP/1.1\r\n", 16);
    assert_int_equal(edge_http_head_len(buf, 16), 0);
    memcpy(buf + 16, "\r\nextra", 7);
    assert_int_equal(edge_http_head_len(buf, 23), 18);
    assert_int_equal(edge_http_head_len(buf, 17), 0);
    memset(buf, 'x', EDGE_HTTP_MAX_HEAD + 100);
    memcpy(buf + EDGE_HTTP_MAX_HEAD - 4, "\r\n\r\n", 4);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD), EDGE_HTTP_MAX_HEAD);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD + 100), EDGE_HTTP_MAX_HEAD);
    memset(buf, 'x', EDGE_HTTP_MAX_HEAD + 100);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD - 1), 0);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD), -1);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD + 100), -1);
    /* the blank line one byte past 8 KiB is past the bound */
    memcpy(buf + EDGE_HTTP_MAX_HEAD - 3, "\r\n\r\n", 4);
    assert_int_equal(edge_http_head_len(buf, EDGE_HTTP_MAX_HEAD + 1), -1);
    free(buf);
}

/* ---- permessage-deflate ---------------------------------------------------------- */

static struct edge_pmd offer_conf(const char *ext, const struct edge_pmd_conf *conf)
{
    char h[2048];
    struct edge_http_req r;

    snprintf(h, sizeof(h), "Sec-WebSocket-Extensions: %s\r\n", ext);
    parse_conf(upgrade(h), conf, &r);
    assert_int_equal(r.status, 0);
    return r.pmd;
}

static struct edge_pmd offer(const char *ext)
{
    return offer_conf(ext, &PMD);
}

/* The 101's extension header for an offer. */
static const char *answer(const char *ext, const struct edge_pmd_conf *conf)
{
    static char out[512];
    char h[2048];
    struct edge_http_req r;
    char *e;

    snprintf(h, sizeof(h), "Sec-WebSocket-Extensions: %s\r\n", ext);
    parse_conf(upgrade(h), conf, &r);
    assert_int_equal(r.status, 0);
    assert_true(edge_http_101(&r, out, sizeof(out)) > 0);
    e = strstr(out, "Sec-WebSocket-Extensions: ");
    if (!e)
        return "";
    e += strlen("Sec-WebSocket-Extensions: ");
    *strstr(e, "\r\n") = '\0';
    return e;
}

static void test_pmd_bare(void **state)
{
    struct edge_pmd p = offer("permessage-deflate");

    (void)state;
    assert_true(p.on);
    assert_false(p.server_no_takeover);
    assert_false(p.client_no_takeover);
    assert_false(p.client_window_set);
    assert_int_equal(p.server_window, 15);
    assert_int_equal(p.client_window, 15);
    assert_string_equal(answer("permessage-deflate", &PMD),
                        "permessage-deflate; server_max_window_bits=15");
    /* disabled: no extension whatever the offer */
    {
        struct edge_pmd_conf off = {false, 15, 15};

        assert_false(offer_conf("permessage-deflate", &off).on);
        assert_string_equal(answer("permessage-deflate", &off), "");
    }
    /* no offer */
    assert_false(offer("").on);
}

static void test_pmd_client_window(void **state)
{
    struct edge_pmd_conf small = {true, 10, 11};
    struct edge_pmd p;

    (void)state;
    /* without a value: we choose (our configured client window) */
    p = offer_conf("permessage-deflate; client_max_window_bits", &small);
    assert_true(p.on);
    assert_true(p.client_window_set);
    assert_int_equal(p.client_window, 11);
    assert_int_equal(p.server_window, 10);
    assert_string_equal(answer("permessage-deflate; client_max_window_bits", &small),
                        "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11");
    /* with a value: the smaller of the two */
    p = offer_conf("permessage-deflate; client_max_window_bits=9", &small);
    assert_int_equal(p.client_window, 9);
    p = offer_conf("permessage-deflate; client_max_window_bits=14", &small);
    assert_int_equal(p.client_window, 11);
    p = offer("permessage-deflate; client_max_window_bits=\"12\"");
    assert_true(p.on);
    assert_int_equal(p.client_window, 12);
    /* RFC 7692 §7.1.2.2: the answer never exceeds the client's value */
    assert_string_equal(answer("permessage-deflate; client_max_window_bits=8", &small),
                        "permessage-deflate; server_max_window_bits=10; client_max_window_bits=8");
    /* not offered: the client may use 15, and is not told otherwise */
    p = offer_conf("permessage-deflate", &small);
    assert_false(p.client_window_set);
    assert_int_equal(p.client_window, 15);
    /* invalid values decline the offer */
    assert_false(offer("permessage-deflate; client_max_window_bits=7").on);
    assert_false(offer("permessage-deflate; client_max_window_bits=16").on);
    assert_false(offer("permessage-deflate; client_max_window_bits=abc").on);
    assert_false(offer("permessage-deflate; client_max_window_bits=").on);
}

static void test_pmd_server_window(void **state)
{
    struct edge_pmd p;

    (void)state;
    p = offer("permessage-deflate; server_max_window_bits=12");
    assert_true(p.on);
    assert_int_equal(p.server_window, 12);
    assert_string_equal(answer("permessage-deflate; server_max_window_bits=12", &PMD),
                        "permessage-deflate; server_max_window_bits=12");
    {
        struct edge_pmd_conf small = {true, 10, 15};

        /* ours is already smaller: the agreed value is the minimum */
        assert_int_equal(
            offer_conf("permessage-deflate; server_max_window_bits=12", &small).server_window, 10);
    }
    /* 8: zlib cannot compress with a 256-byte window, so declined */
    assert_false(offer("permessage-deflate; server_max_window_bits=8").on);
    assert_false(offer("permessage-deflate; server_max_window_bits=7").on);
    assert_false(offer("permessage-deflate; server_max_window_bits=16").on);
    assert_false(offer("permessage-deflate; server_max_window_bits").on);
    /* a declined offer leaves the next one */
    p = offer("permessage-deflate; server_max_window_bits=8, permessage-deflate");
    assert_true(p.on);
    assert_int_equal(p.server_window, 15);
}

static void test_pmd_takeover(void **state)
{
    struct edge_pmd p;

    (void)state;
    p = offer("permessage-deflate; server_no_context_takeover");
    assert_true(p.on);
    assert_true(p.server_no_takeover);
    assert_false(p.client_no_takeover);
    assert_string_equal(answer("permessage-deflate; server_no_context_takeover", &PMD),
                        "permessage-deflate; server_max_window_bits=15; "
                        "server_no_context_takeover");
    p = offer("permessage-deflate;client_no_context_takeover");
    assert_true(p.on);
    assert_true(p.client_no_takeover);
    assert_string_equal(answer("permessage-deflate; client_no_context_takeover; "
                               "server_no_context_takeover; client_max_window_bits=10; "
                               "server_max_window_bits=9",
                               &PMD),
                        "permessage-deflate; server_max_window_bits=9; "
                        "server_no_context_takeover; client_no_context_takeover; "
                        "client_max_window_bits=10");
    /* a value where none is allowed */
    assert_false(offer("permessage-deflate; server_no_context_takeover=1").on);
}

static void test_pmd_declined(void **state)
{
    char ext[1200];
    struct edge_pmd p;

    (void)state;
    /* a parameter twice: declined, then the next offer is taken */
    p = offer("permessage-deflate; server_no_context_takeover; server_no_context_takeover, "
              "permessage-deflate; client_max_window_bits");
    assert_true(p.on);
    assert_false(p.server_no_takeover);
    assert_true(p.client_window_set);
    assert_false(offer("permessage-deflate; client_max_window_bits=10; "
                       "client_max_window_bits=11")
                     .on);
    assert_false(
        offer("permessage-deflate; server_max_window_bits=10; server_max_window_bits=10").on);
    /* an unknown parameter */
    assert_false(offer("permessage-deflate; mux").on);
    /* a 1,000-character parameter name, then one as a value */
    memset(ext, 0, sizeof(ext));
    strcpy(ext, "permessage-deflate; ");
    memset(ext + strlen(ext), 'x', 1000);
    assert_false(offer(ext).on);
    strcat(ext, ", permessage-deflate");
    assert_true(offer(ext).on);
    memset(ext, 0, sizeof(ext));
    strcpy(ext, "permessage-deflate; client_max_window_bits=");
    memset(ext + strlen(ext), '1', 900);
    assert_false(offer(ext).on);
    strcat(ext, ", permessage-deflate; server_no_context_takeover");
    p = offer(ext);
    assert_true(p.on);
    assert_true(p.server_no_takeover);
    /* a quoted value with a comma in it does not start a new offer */
    assert_false(offer("permessage-deflate; x=\"a, permessage-deflate\"").on);
    /* bad syntax */
    assert_false(offer("permessage-deflate; ; ").on);
    assert_false(offer("permessage-deflate junk").on);
    assert_false(offer("permessage-deflate; client_max_window_bits=\"12").on);
}

static void test_pmd_unknown_extension(void **state)
{
    struct edge_pmd p;

    (void)state;
    assert_false(offer("x-webkit-deflate-frame").on);
    assert_false(offer("permessage-deflat").on);
    assert_false(offer("permessage-deflatex").on);
    p = offer("x-webkit-deflate-frame; no_context_takeover, permessage-deflate; "
              "client_max_window_bits");
    assert_true(p.on);
    assert_true(p.client_window_set);
    /* the header may come as several lines */
    {
        struct edge_http_req r;

        parse(upgrade("Sec-WebSocket-Extensions: foo\r\n"
                      "Sec-WebSocket-Extensions: permessage-deflate; "
                      "server_no_context_takeover\r\n"),
              &r);
        assert_int_equal(r.status, 0);
        assert_true(r.pmd.on);
        assert_true(r.pmd.server_no_takeover);
    }
    /* Case does not matter for the name */
    assert_true(offer("PerMessage-Deflate").on);
}

/* ---- tunnel paths ------------------------------------------------------------ */

static void test_tunnel_paths(void **state)
{
    static const char hdrs[] = "Host: 127.0.0.1\r\n"
                               "Upgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Key: " KEY "\r\n"
                               "Sec-WebSocket-Version: 13\r\n"
                               "Max-Frame-Size: 10922\r\n"
                               "appKey: secret\r\n"
                               "User-Agent: ThingWorx C SDK\r\n"
                               "Cookie: JSESSIONID=abc; x=y\r\n"
                               "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    struct edge_http_req r;
    char line[512];

    (void)state;
    tunnels = false;
    parse(req("GET /Thingworx/WSTunnelServer/xdeadbeef~tun-1 HTTP/1.1", hdrs), &r);
    assert_int_equal(r.status, 404); /* not without the core's consent */
    tunnels = true;
    parse(req("GET /Thingworx/WSTunnelServer/xdeadbeef~tun-1 HTTP/1.1", hdrs), &r);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.tunnel, EDGE_TUNNEL_SERVER);
    assert_string_equal(r.tid, "xdeadbeef~tun-1");
    assert_false(r.pmd.on); /* offered, never taken on a tunnel */
    assert_int_equal(r.max_frame, 10922);
    assert_string_equal(r.app_key, "secret");
    assert_string_equal(r.user_agent, "ThingWorx C SDK");
    assert_string_equal(r.cookie, "JSESSIONID=abc; x=y");
    parse(req("GET /Thingworx/WSTunnelClient/abc HTTP/1.1", hdrs), &r);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.tunnel, EDGE_TUNNEL_CLIENT);
    assert_string_equal(r.tid, "abc");
    /* the usual path is no tunnel */
    parse(req("GET " PATH " HTTP/1.1", hdrs), &r);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.tunnel, EDGE_TUNNEL_NONE);
    /* no tid, a tid with a path separator, escapes, or too long: 404 */
    const char *bad[] = {"/Thingworx/WSTunnelServer/", "/Thingworx/WSTunnelServer/a/b",
                         "/Thingworx/WSTunnelServer/a%20b", "/Thingworx/WSTunnelServerX",
                         "/Thingworx/WSTunnelClient/"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(line, sizeof(line), "GET %s HTTP/1.1", bad[i]);
        parse(req(line, hdrs), &r);
        assert_int_equal(r.status, 404);
    }
    char longtid[EDGE_TID_MAX + 2];
    memset(longtid, 'a', sizeof(longtid) - 1);
    longtid[sizeof(longtid) - 1] = '\0';
    snprintf(line, sizeof(line), "GET /Thingworx/WSTunnelServer/%s HTTP/1.1", longtid);
    parse(req(line, hdrs), &r);
    assert_int_equal(r.status, 404);
    longtid[EDGE_TID_MAX] = '\0';
    snprintf(line, sizeof(line), "GET /Thingworx/WSTunnelServer/%s HTTP/1.1", longtid);
    parse(req(line, hdrs), &r);
    assert_int_equal(r.status, 0);
    tunnels = false;
}

static void test_tunnel_response(void **state)
{
    /* RFC 6455 §1.3's sample key and accept */
    static const char key[] = "dGhlIHNhbXBsZSBub25jZQ==";
    struct edge_http_resp r;
    const char *ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    const char *wrong_accept = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               "Connection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
    const char *no_upgrade = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    const char *ext = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                      "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
    const char *nf = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

    (void)state;
    edge_http_parse_response(ok, strlen(ok), key, &r);
    assert_true(r.upgraded);
    assert_int_equal(r.status, 101);
    edge_http_parse_response(wrong_accept, strlen(wrong_accept), key, &r);
    assert_false(r.upgraded);
    assert_non_null(r.why);
    edge_http_parse_response(no_upgrade, strlen(no_upgrade), key, &r);
    assert_false(r.upgraded);
    edge_http_parse_response(ext, strlen(ext), key, &r);
    assert_false(r.upgraded);
    edge_http_parse_response(nf, strlen(nf), key, &r);
    assert_false(r.upgraded);
    assert_int_equal(r.status, 404);
    edge_http_parse_response("garbage\r\n\r\n", 11, key, &r);
    assert_false(r.upgraded);
    assert_int_equal(r.status, 0);
    assert_non_null(r.why);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepted),
        cmocka_unit_test(test_tunnel_paths),
        cmocka_unit_test(test_tunnel_response),
        cmocka_unit_test(test_method),
        cmocka_unit_test(test_version_of_http),
        cmocka_unit_test(test_path),
        cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_ws_version),
        cmocka_unit_test(test_too_long),
        cmocka_unit_test(test_pmd_bare),
        cmocka_unit_test(test_pmd_client_window),
        cmocka_unit_test(test_pmd_server_window),
        cmocka_unit_test(test_pmd_takeover),
        cmocka_unit_test(test_pmd_declined),
        cmocka_unit_test(test_pmd_unknown_extension),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
