/* The AlwaysOn codec: the captured vectors of docs/protocol.md round-trip
 * byte for byte, and every truncated or malformed input is refused. Prefixes
 * are copied into exactly-sized heap buffers so the sanitizer build catches
 * any read past `len`. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"

/* ---- a small byte builder for hand-made inputs ---- */

struct bb {
    uint8_t b[8192];
    size_t n;
};

static void bb_u8(struct bb *b, uint8_t v)
{
    assert_true(b->n < sizeof(b->b));
    b->b[b->n++] = v;
}

static void bb_u16(struct bb *b, uint16_t v)
{
    bb_u8(b, (uint8_t)(v >> 8));
    bb_u8(b, (uint8_t)v);
}

static void bb_u32(struct bb *b, uint32_t v)
{
    bb_u16(b, (uint16_t)(v >> 16));
    bb_u16(b, (uint16_t)v);
}

static void bb_bytes(struct bb *b, const void *p, size_t n)
{
    assert_true(n <= sizeof(b->b) - b->n);
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void bb_fill(struct bb *b, uint8_t v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bb_u8(b, v);
}

/* A short-form string, as the vectors spell them. */
static void bb_str(struct bb *b, const char *s)
{
    size_t n = strlen(s);
    assert_true(n < 128);
    bb_u8(b, (uint8_t)n);
    bb_bytes(b, s, n);
}

static void bb_hdr(struct bb *b, uint8_t code, uint32_t req, uint32_t ep, uint32_t sess)
{
    bb_u8(b, 0x01);
    bb_u8(b, code);
    bb_u32(b, req);
    bb_u32(b, ep);
    bb_u32(b, sess);
    bb_u8(b, 0x00);
}

static void bb_double(struct bb *b, double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    bb_u32(b, (uint32_t)(u >> 32));
    bb_u32(b, (uint32_t)u);
}

static const char APP_KEY[] = "d1c4a7e2-3b5f-4c8d-9e0a-1f2b3c4d5e6f";

/* ---- the captured vectors ---- */

static void vec_auth(struct bb *b)
{
    bb_hdr(b, 0x14, 2, 0, 0xFFFFFFFF);
    bb_u8(b, 0x01);
    bb_str(b, "appKey");
    bb_str(b, APP_KEY);
}

static void vec_bind(struct bb *b)
{
    bb_hdr(b, 0x0A, 3, 0, 0x1234ABCD);
    bb_u8(b, 0x00);
    bb_u16(b, 1);
    bb_str(b, "SteamSensor");
}

static void vec_get(struct bb *b)
{
    bb_hdr(b, 0x01, 0x309, 0x2A, 0x1234ABCD);
    bb_u8(b, 0x0A);
    bb_str(b, "SteamSensor");
    bb_u8(b, 0x01);
    bb_str(b, "Temperature");
    bb_u8(b, 0x00);
    bb_u8(b, 0xFF);
}

static void vec_not_found(struct bb *b)
{
    bb_hdr(b, 0x84, 0x309, 0x2A, 0x1234ABCD);
    bb_u8(b, 0x00);
    bb_u8(b, 0xFF);
}

static void it_pressure(struct bb *b)
{
    bb_u8(b, 0x01);
    bb_str(b, "Pressure");
    bb_u8(b, 0x00); /* empty description */
    bb_u8(b, 0x01); /* NUMBER */
    bb_u16(b, 0);
    bb_u8(b, 0x00);
    bb_u8(b, 0x01);
    bb_u16(b, 1);
    bb_u8(b, 0x01);
    bb_double(b, 42.5);
    bb_u8(b, 0x00);
}

static void vec_success(struct bb *b)
{
    bb_hdr(b, 0x40, 0x30A, 0x2B, 0x1234ABCD);
    bb_u8(b, 0x00);
    bb_u8(b, 0x05);
    it_pressure(b);
}

static void it_fault(struct bb *b)
{
    bb_u8(b, 0x01);
    bb_str(b, "message");
    bb_str(b, "why it fired");
    bb_u8(b, 0x00); /* STRING */
    bb_u16(b, 0);
    bb_u8(b, 0x00);
    bb_u8(b, 0x01);
    bb_u16(b, 1);
    bb_u8(b, 0x00);
    bb_str(b, "Pressure over limit");
    bb_u8(b, 0x00);
}

static void vec_post(struct bb *b)
{
    bb_hdr(b, 0x03, 4, 0, 0x1234ABCD);
    bb_u8(b, 0x0A);
    bb_str(b, "SteamSensor");
    bb_u8(b, 0x03);
    bb_str(b, "SteamSensorFault");
    bb_u8(b, 0x00);
    bb_u8(b, 0x05);
    it_fault(b);
}

/* chunk 2 of 3 of a PUT: header · multipart header · entityType · entityName
 * · payload */
static void vec_chunk(struct bb *b)
{
    bb_u8(b, 0x01);
    bb_u8(b, 0x02);
    bb_u32(b, 9);
    bb_u32(b, 0);
    bb_u32(b, 0x1234ABCD);
    bb_u8(b, 0x01);
    bb_u16(b, 2);
    bb_u16(b, 3);
    bb_u16(b, 8192);
    bb_u8(b, 0x0A);
    bb_str(b, "SteamSensor");
    bb_fill(b, 0x5A, 40);
}

/* Header then the body parser that the code calls for. */
static int parse_message(const uint8_t *p, size_t n)
{
    struct emx_ao_header h;
    size_t off;
    int rc = emx_ao_header_parse(p, n, &h, &off);
    if (rc != EMX_AO_OK)
        return rc;
    const uint8_t *body = p + off;
    size_t blen = n - off;
    if (h.multipart) {
        uint8_t et;
        struct emx_ao_str en;
        size_t po;
        return emx_ao_multipart_prefix_parse(body, blen, &et, &en, &po);
    }
    if (emx_ao_is_response(h.code)) {
        struct emx_ao_response r;
        return emx_ao_response_parse(body, blen, &r);
    }
    switch (h.code) {
    case EMX_AO_AUTH: {
        uint8_t c;
        return emx_ao_auth_parse(body, blen, &c);
    }
    case EMX_AO_BIND:
    case EMX_AO_UNBIND: {
        struct emx_ao_bind bd;
        return emx_ao_bind_parse(body, blen, &bd);
    }
    default: {
        struct emx_ao_request rq;
        return emx_ao_request_parse(body, blen, &rq);
    }
    }
}

/* Every proper prefix of a message must be refused, from an exactly-sized
 * heap copy. */
static void check_all_prefixes(const uint8_t *p, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        uint8_t *copy = malloc(k ? k : 1);
        assert_non_null(copy);
        memcpy(copy, p, k);
        int rc = parse_message(copy, k);
        if (rc >= 0)
            fail_msg("prefix of %zu of %zu bytes accepted", k, n);
        free(copy);
    }
    assert_int_equal(parse_message(p, n), EMX_AO_OK);
}

/* ---- vectors ---- */

static void test_vector_auth(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_auth(&v);
    assert_int_equal(strlen(APP_KEY), 36);
    assert_int_equal(v.n, 60);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(off, 15);
    assert_int_equal(h.version, 1);
    assert_int_equal(h.code, EMX_AO_AUTH);
    assert_int_equal(h.request_id, 2);
    assert_int_equal(h.endpoint_id, 0);
    assert_int_equal(h.session_id, EMX_AO_AUTH_SESSION);
    assert_false(h.multipart);

    uint8_t claims = 0;
    assert_int_equal(emx_ao_auth_parse(v.b + off, v.n - off, &claims), EMX_AO_OK);
    assert_int_equal(claims, 1);
    struct emx_ao_str key;
    assert_int_equal(emx_ao_auth_find_claim(v.b + off, v.n - off, "appKey", &key), EMX_AO_OK);
    assert_true(emx_ao_str_eq(key, APP_KEY));
    assert_int_equal(emx_ao_auth_find_claim(v.b + off, v.n - off, "password", &key), EMX_AO_EBODY);

    uint8_t out[128];
    assert_int_equal(emx_ao_build_auth(out, sizeof(out), 2, 0, APP_KEY, 36), 60);
    assert_memory_equal(out, v.b, 60);
    check_all_prefixes(v.b, v.n);
}

static void test_vector_bind(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_bind(&v);
    assert_int_equal(v.n, 30);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_BIND);
    assert_int_equal(h.request_id, 3);
    assert_int_equal(h.session_id, 0x1234ABCD);
    struct emx_ao_bind bd;
    assert_int_equal(emx_ao_bind_parse(v.b + off, v.n - off, &bd), EMX_AO_OK);
    assert_false(bd.has_gateway);
    assert_int_equal(bd.count, 1);
    size_t cur = 0;
    struct emx_ao_str name;
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &name), EMX_AO_OK);
    assert_true(emx_ao_str_eq(name, "SteamSensor"));
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &name), 1);

    uint8_t out[64];
    struct emx_ao_str names[] = {{(const uint8_t *)"SteamSensor", 11}};
    assert_int_equal(emx_ao_build_bind(out, sizeof(out), EMX_AO_BIND, 3, 0, 0x1234ABCD, names, 1),
                     30);
    assert_memory_equal(out, v.b, 30);
    check_all_prefixes(v.b, v.n);
}

static void test_vector_get(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_get(&v);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_GET);
    assert_int_equal(h.request_id, 0x309);
    assert_int_equal(h.endpoint_id, 0x2A);
    struct emx_ao_request rq;
    assert_int_equal(emx_ao_request_parse(v.b + off, v.n - off, &rq), EMX_AO_OK);
    assert_int_equal(rq.entity_type, 0x0A);
    assert_true(emx_ao_str_eq(rq.entity_name, "SteamSensor"));
    assert_int_equal(rq.characteristic, 0x01);
    assert_true(emx_ao_str_eq(rq.name, "Temperature"));
    assert_int_equal(rq.header_count, 0);
    assert_int_equal(rq.headers_len, 0);
    assert_false(rq.has_params);

    uint8_t out[128];
    size_t n = emx_ao_build_request(out, sizeof(out), EMX_AO_GET, 0x309, 0x2A, 0x1234ABCD, 0x0A,
                                    "SteamSensor", 0x01, "Temperature", NULL, 0);
    assert_int_equal(n, v.n);
    assert_memory_equal(out, v.b, n);
    check_all_prefixes(v.b, v.n);
}

static void test_vector_not_found(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_not_found(&v);
    assert_int_equal(v.n, 17);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_NOT_FOUND);
    struct emx_ao_response r;
    assert_int_equal(emx_ao_response_parse(v.b + off, v.n - off, &r), EMX_AO_OK);
    assert_false(r.has_reason);
    assert_false(r.has_content);

    uint8_t out[32];
    assert_int_equal(
        emx_ao_build_response(out, sizeof(out), EMX_AO_NOT_FOUND, 0x309, 0x2A, 0x1234ABCD, NULL),
        17);
    assert_memory_equal(out, v.b, 17);
    check_all_prefixes(v.b, v.n);
}

struct seen {
    int fields, rows, values;
    uint8_t field_type[64];
    char field_name[64][32];
    uint8_t value_type[64];
    size_t value_len[64];
    const uint8_t *value_ptr[64];
    uint16_t row_fields;
    int stop_at; /* value index that returns non-zero; -1: never */
};

static int on_field(void *user, struct emx_ao_str name, struct emx_ao_str desc, uint8_t bt,
                    uint16_t aspects)
{
    (void)desc;
    (void)aspects;
    struct seen *s = user;
    if (s->fields < 64) {
        s->field_type[s->fields] = bt;
        size_t n = name.len < 31 ? name.len : 31;
        memcpy(s->field_name[s->fields], name.ptr, n);
        s->field_name[s->fields][n] = '\0';
    }
    s->fields++;
    return 0;
}

static int on_row(void *user, uint16_t n)
{
    struct seen *s = user;
    s->rows++;
    s->row_fields = n;
    return 0;
}

static int on_value(void *user, uint8_t bt, const uint8_t *p, size_t len)
{
    struct seen *s = user;
    if (s->stop_at == s->values)
        return 7;
    if (s->values < 64) {
        s->value_type[s->values] = bt;
        s->value_len[s->values] = len;
        s->value_ptr[s->values] = p;
    }
    s->values++;
    return 0;
}

static void test_vector_success(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_success(&v);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_SUCCESS);
    assert_int_equal(h.request_id, 0x30A);
    assert_int_equal(h.endpoint_id, 0x2B);
    struct emx_ao_response r;
    assert_int_equal(emx_ao_response_parse(v.b + off, v.n - off, &r), EMX_AO_OK);
    assert_false(r.has_reason);
    assert_true(r.has_content);
    assert_ptr_equal(r.content, v.b + off + 2);
    assert_int_equal(r.content_len, v.n - off - 2);

    struct seen s = {.stop_at = -1};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    size_t used = 0;
    assert_int_equal(emx_ao_walk_infotable(r.content, r.content_len, &vis, &used), EMX_AO_OK);
    assert_int_equal(used, r.content_len);
    assert_int_equal(s.fields, 1);
    assert_string_equal(s.field_name[0], "Pressure");
    assert_int_equal(s.field_type[0], EMX_BT_NUMBER);
    assert_int_equal(s.rows, 1);
    assert_int_equal(s.row_fields, 1);
    assert_int_equal(s.values, 1);
    assert_int_equal(s.value_type[0], EMX_BT_NUMBER);
    assert_int_equal(s.value_len[0], 8);
    uint64_t u =
        ((uint64_t)emx_ao_get_u32(s.value_ptr[0]) << 32) | emx_ao_get_u32(s.value_ptr[0] + 4);
    double d;
    memcpy(&d, &u, sizeof(d));
    assert_true(d == 42.5);

    /* Re-encode from the parsed parts. */
    uint8_t out[128];
    size_t n = emx_ao_header_write(out, sizeof(out), &h);
    assert_int_equal(n, 15);
    out[n++] = 0x00;
    out[n++] = 0x05;
    memcpy(out + n, r.content, r.content_len);
    n += r.content_len;
    assert_int_equal(n, v.n);
    assert_memory_equal(out, v.b, n);
    check_all_prefixes(v.b, v.n);
}

static void test_vector_post_event(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_post(&v);
    struct bb it = {.n = 0};
    it_fault(&it);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_POST);
    struct emx_ao_request rq;
    assert_int_equal(emx_ao_request_parse(v.b + off, v.n - off, &rq), EMX_AO_OK);
    assert_int_equal(rq.entity_type, 0x0A);
    assert_true(emx_ao_str_eq(rq.entity_name, "SteamSensor"));
    assert_int_equal(rq.characteristic, 0x03);
    assert_true(emx_ao_str_eq(rq.name, "SteamSensorFault"));
    assert_true(rq.has_params);
    assert_int_equal(rq.params_len, it.n);
    assert_memory_equal(rq.params, it.b, it.n);

    struct seen s = {.stop_at = -1};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    assert_int_equal(emx_ao_walk_infotable(rq.params, rq.params_len, &vis, NULL), EMX_AO_OK);
    assert_int_equal(s.fields, 1);
    assert_string_equal(s.field_name[0], "message");
    assert_int_equal(s.field_type[0], EMX_BT_STRING);
    assert_int_equal(s.values, 1);
    assert_int_equal(s.value_type[0], EMX_BT_STRING);
    assert_int_equal(s.value_len[0], 1 + strlen("Pressure over limit"));

    uint8_t out[256];
    size_t n = emx_ao_build_request(out, sizeof(out), EMX_AO_POST, 4, 0, 0x1234ABCD, 0x0A,
                                    "SteamSensor", 0x03, "SteamSensorFault", it.b, it.n);
    assert_int_equal(n, v.n);
    assert_memory_equal(out, v.b, n);
    check_all_prefixes(v.b, v.n);
}

static void test_multipart_chunk(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_chunk(&v);

    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_OK);
    assert_true(h.multipart);
    assert_int_equal(off, 21);
    assert_int_equal(h.chunk_id, 2);
    assert_int_equal(h.chunk_count, 3);
    assert_int_equal(h.chunk_size, 8192);
    uint8_t et;
    struct emx_ao_str en;
    size_t po;
    assert_int_equal(emx_ao_multipart_prefix_parse(v.b + off, v.n - off, &et, &en, &po), EMX_AO_OK);
    assert_int_equal(et, 0x0A);
    assert_true(emx_ao_str_eq(en, "SteamSensor"));
    assert_int_equal(po, 13);
    assert_int_equal(v.n - off - po, 40);

    uint8_t out[32];
    assert_int_equal(emx_ao_header_write(out, sizeof(out), &h), 21);
    assert_memory_equal(out, v.b, 21);

    /* Prefixes up to the end of entityName are refused; the payload itself
     * may be any length. */
    for (size_t k = 0; k < off + 13; k++) {
        uint8_t *copy = malloc(k ? k : 1);
        assert_non_null(copy);
        memcpy(copy, v.b, k);
        assert_true(parse_message(copy, k) < 0);
        free(copy);
    }
}

/* ---- codes ---- */

static void test_codes(void **state)
{
    (void)state;
    static const struct {
        uint8_t code;
        const char *name;
    } known[] = {
        {0x01, "GET"},
        {0x02, "PUT"},
        {0x03, "POST"},
        {0x04, "DELETE"},
        {0x0A, "BIND"},
        {0x0B, "UNBIND"},
        {0x14, "AUTH"},
        {0x1F, "KEEP_ALIVE"},
        {0x40, "SUCCESS"},
        {0x80, "BAD_REQUEST"},
        {0x81, "UNAUTHORIZED"},
        {0x83, "FORBIDDEN"},
        {0x84, "NOT_FOUND"},
        {0x8D, "ENTITY_TOO_LARGE"},
        {0xA0, "INTERNAL_SERVER_ERROR"},
        {0xA1, "NOT_IMPLEMENTED"},
        {0xA2, "BAD_GATEWAY"},
        {0xA3, "SERVICE_UNAVAILABLE"},
        {0xA4, "GATEWAY_TIMEOUT"},
    };
    size_t nknown = sizeof(known) / sizeof(known[0]);
    int requests = 0, codes = 0;
    for (unsigned c = 0; c < 256; c++) {
        const char *expect = NULL;
        for (size_t i = 0; i < nknown; i++)
            if (known[i].code == c)
                expect = known[i].name;
        const char *name = emx_ao_code_name((uint8_t)c);
        assert_non_null(name);
        if (expect) {
            assert_string_equal(name, expect);
            assert_true(emx_ao_is_known_code((uint8_t)c));
            codes++;
        } else {
            assert_string_equal(name, "UNKNOWN");
            assert_false(emx_ao_is_known_code((uint8_t)c));
        }
        assert_int_equal(emx_ao_is_response((uint8_t)c), c >= 0x40);
        if (emx_ao_is_known_request((uint8_t)c)) {
            assert_non_null(expect);
            assert_true(c < 0x40);
            requests++;
        }
    }
    assert_int_equal(codes, 19);
    assert_int_equal(requests, 8);
    assert_true(emx_ao_is_known_request(EMX_AO_KEEP_ALIVE));
    assert_false(emx_ao_is_known_request(0x05));
    assert_false(emx_ao_is_known_request(EMX_AO_SUCCESS));
}

static void test_strerror(void **state)
{
    (void)state;
    for (int e = 0; e >= -7; e--) {
        assert_non_null(emx_ao_strerror(e));
        assert_true(strlen(emx_ao_strerror(e)) > 0);
    }
    assert_string_equal(emx_ao_strerror(-100), "unknown codec error");
    assert_string_not_equal(emx_ao_strerror(EMX_AO_ETRUNC), emx_ao_strerror(EMX_AO_ETRAIL));
}

/* ---- header ---- */

static void test_header_errors(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    vec_not_found(&v);
    struct emx_ao_header h;
    size_t off;
    for (size_t k = 0; k < 15; k++)
        assert_int_equal(emx_ao_header_parse(v.b, k, &h, &off), EMX_AO_ETRUNC);

    v.b[0] = 0x02;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_EVERSION);
    v.b[0] = 0x00;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_EVERSION);
    v.b[0] = 0x01;
    v.b[14] = 0x02;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_EMULTIPART);
    v.b[14] = 0xFF;
    assert_int_equal(emx_ao_header_parse(v.b, v.n, &h, &off), EMX_AO_EMULTIPART);

    struct bb c = {.n = 0};
    vec_chunk(&c);
    for (size_t k = 15; k < 21; k++)
        assert_int_equal(emx_ao_header_parse(c.b, k, &h, &off), EMX_AO_ETRUNC);
    /* A multipart header alone, no body yet, still parses. */
    assert_int_equal(emx_ao_header_parse(c.b, 21, &h, &off), EMX_AO_OK);

    static const uint16_t bad[][2] = {{0, 3}, {1, 0}, {0, 0}, {4, 3}, {0xFFFF, 0xFFFE}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        emx_ao_put_u16(c.b + 15, bad[i][0]);
        emx_ao_put_u16(c.b + 17, bad[i][1]);
        assert_int_equal(emx_ao_header_parse(c.b, c.n, &h, &off), EMX_AO_EMULTIPART);
    }
    emx_ao_put_u16(c.b + 15, 3);
    emx_ao_put_u16(c.b + 17, 3);
    assert_int_equal(emx_ao_header_parse(c.b, c.n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.chunk_id, 3);
    emx_ao_put_u16(c.b + 15, 1);
    emx_ao_put_u16(c.b + 17, 1);
    assert_int_equal(emx_ao_header_parse(c.b, c.n, &h, &off), EMX_AO_OK);

    /* body_off may be NULL. */
    assert_int_equal(emx_ao_header_parse(c.b, c.n, &h, NULL), EMX_AO_OK);
}

static void test_header_write(void **state)
{
    (void)state;
    struct emx_ao_header h = {
        .code = EMX_AO_PUT,
        .request_id = 0xDEADBEEF,
        .endpoint_id = 0x80000001,
        .session_id = 0x01020304,
        .multipart = true,
        .chunk_id = 129,
        .chunk_count = 129,
        .chunk_size = 8192,
    };
    uint8_t out[32];
    memset(out, 0xEE, sizeof(out));
    for (size_t cap = 0; cap < 21; cap++)
        assert_int_equal(emx_ao_header_write(out, cap, &h), 0);
    assert_int_equal(emx_ao_header_write(out, sizeof(out), &h), 21);
    assert_int_equal(out[21], 0xEE);
    static const uint8_t expect[] = {0x01, 0x02, 0xDE, 0xAD, 0xBE, 0xEF, 0x80,
                                     0x00, 0x00, 0x01, 0x01, 0x02, 0x03, 0x04,
                                     0x01, 0x00, 0x81, 0x00, 0x81, 0x20, 0x00};
    assert_memory_equal(out, expect, 21);
    struct emx_ao_header back;
    size_t off;
    assert_int_equal(emx_ao_header_parse(out, 21, &back, &off), EMX_AO_OK);
    assert_int_equal(back.request_id, h.request_id);
    assert_int_equal(back.endpoint_id, h.endpoint_id);
    assert_int_equal(back.session_id, h.session_id);
    assert_int_equal(back.chunk_id, 129);
    assert_int_equal(back.chunk_count, 129);
    assert_int_equal(back.chunk_size, 8192);

    /* Chunk numbers the parser would refuse are not written. */
    h.chunk_id = 0;
    assert_int_equal(emx_ao_header_write(out, sizeof(out), &h), 0);
    h.chunk_id = 130;
    assert_int_equal(emx_ao_header_write(out, sizeof(out), &h), 0);

    h.multipart = false;
    for (size_t cap = 0; cap < 15; cap++)
        assert_int_equal(emx_ao_header_write(out, cap, &h), 0);
    assert_int_equal(emx_ao_header_write(out, 15, &h), 15);
    assert_int_equal(out[14], 0);
    assert_int_equal(emx_ao_get_u32(out + EMX_AO_OFF_REQUEST_ID), 0xDEADBEEF);
}

/* ---- strings ---- */

static void test_strings_short_long(void **state)
{
    (void)state;
    uint8_t text[200];
    for (size_t i = 0; i < sizeof(text); i++)
        text[i] = (uint8_t)('a' + i % 26);
    uint8_t out[256];

    assert_int_equal(emx_ao_str_size(0), 1);
    assert_int_equal(emx_ao_str_size(127), 128);
    assert_int_equal(emx_ao_str_size(128), 132);

    assert_int_equal(emx_ao_write_str(out, sizeof(out), text, 127), 128);
    assert_int_equal(out[0], 0x7F);
    struct emx_ao_reader r = {out, 128, 0};
    struct emx_ao_str s;
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_OK);
    assert_int_equal(s.len, 127);
    assert_ptr_equal(s.ptr, out + 1);
    assert_memory_equal(s.ptr, text, 127);
    assert_int_equal(r.pos, 128);

    assert_int_equal(emx_ao_write_str(out, sizeof(out), text, 128), 132);
    assert_int_equal(emx_ao_get_u32(out), 0x80000080u);
    r = (struct emx_ao_reader){out, 132, 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_OK);
    assert_int_equal(s.len, 128);
    assert_ptr_equal(s.ptr, out + 4);
    assert_memory_equal(s.ptr, text, 128);

    /* Every prefix of both forms is truncated, and the cursor stays put. */
    for (size_t k = 0; k < 132; k++) {
        r = (struct emx_ao_reader){out, k, 0};
        assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_ETRUNC);
        assert_int_equal(r.pos, 0);
    }

    /* The empty string. */
    assert_int_equal(emx_ao_write_str(out, sizeof(out), NULL, 0), 1);
    assert_int_equal(out[0], 0);
    r = (struct emx_ao_reader){out, 1, 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_OK);
    assert_int_equal(s.len, 0);
    assert_true(emx_ao_str_eq(s, ""));
    assert_false(emx_ao_str_eq(s, "x"));
    assert_false(emx_ao_str_eq(s, NULL));

    /* A long form may carry a small length: readers accept it. */
    static const uint8_t small_long[] = {0x80, 0x00, 0x00, 0x02, 'h', 'i'};
    r = (struct emx_ao_reader){small_long, sizeof(small_long), 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_OK);
    assert_true(emx_ao_str_eq(s, "hi"));
}

static void test_strings_past_end(void **state)
{
    (void)state;
    /* Long form whose length points past the end, including the largest. */
    static const uint8_t past[] = {0x80, 0x00, 0x01, 0x00, 'a', 'b', 'c'};
    static const uint8_t huge[] = {0xFF, 0xFF, 0xFF, 0xFF, 'a'};
    static const uint8_t short_past[] = {0x05, 'a', 'b'};
    struct emx_ao_str s;
    struct emx_ao_reader r = {past, sizeof(past), 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_ETRUNC);
    r = (struct emx_ao_reader){huge, sizeof(huge), 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_ETRUNC);
    r = (struct emx_ao_reader){short_past, sizeof(short_past), 0};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_ETRUNC);
    /* A cursor already past its end reads nothing. */
    r = (struct emx_ao_reader){short_past, 2, 3};
    assert_int_equal(emx_ao_read_str(&r, &s), EMX_AO_ETRUNC);

    /* The same inside a body: entityName of a GET claims 256 bytes. */
    struct bb v = {.n = 0};
    bb_u8(&v, 0x0A);
    bb_bytes(&v, past, sizeof(past));
    struct emx_ao_request rq;
    assert_int_equal(emx_ao_request_parse(v.b, v.n, &rq), EMX_AO_ETRUNC);

    uint8_t out[8];
    assert_int_equal(emx_ao_write_str(out, sizeof(out), "abcdefgh", 8), 0);
    assert_int_equal(emx_ao_write_str(out, sizeof(out), "abcdefg", 7), 8);
    assert_int_equal(emx_ao_write_str(out, 0, "", 0), 0);
}

static void test_primitives(void **state)
{
    (void)state;
    static const uint8_t in[] = {0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC};
    struct emx_ao_reader r = {in, sizeof(in), 0};
    uint8_t a;
    uint16_t b;
    uint32_t c;
    assert_int_equal(emx_ao_read_u8(&r, &a), EMX_AO_OK);
    assert_int_equal(a, 0x12);
    assert_int_equal(emx_ao_read_u16(&r, &b), EMX_AO_OK);
    assert_int_equal(b, 0x3456);
    assert_int_equal(emx_ao_read_u32(&r, &c), EMX_AO_ETRUNC);
    assert_int_equal(r.pos, 3);
    assert_int_equal(emx_ao_read_u16(&r, &b), EMX_AO_OK);
    assert_int_equal(b, 0x789A);
    assert_int_equal(emx_ao_read_u16(&r, &b), EMX_AO_ETRUNC);
    assert_int_equal(emx_ao_read_u8(&r, &a), EMX_AO_OK);
    assert_int_equal(a, 0xBC);
    assert_int_equal(emx_ao_read_u8(&r, &a), EMX_AO_ETRUNC);
    assert_int_equal(r.pos, sizeof(in));
    r = (struct emx_ao_reader){in, sizeof(in), 1};
    assert_int_equal(emx_ao_read_u32(&r, &c), EMX_AO_OK);
    assert_int_equal(c, 0x3456789A);
}

/* ---- InfoTables ---- */

/* A table nested `levels` deep: each level has one INFOTABLE field whose row
 * holds the next level; the innermost holds one STRING. */
static void it_nested(struct bb *b, unsigned levels)
{
    bb_u8(b, 0x01);
    bb_str(b, levels > 1 ? "inner" : "leaf");
    bb_u8(b, 0x00);
    bb_u8(b, levels > 1 ? EMX_BT_INFOTABLE : EMX_BT_STRING);
    bb_u16(b, 0);
    bb_u8(b, 0x00);
    bb_u8(b, 0x01);
    bb_u16(b, 1);
    if (levels > 1) {
        bb_u8(b, EMX_BT_INFOTABLE);
        it_nested(b, levels - 1);
    } else {
        bb_u8(b, EMX_BT_STRING);
        bb_str(b, "deep");
    }
    bb_u8(b, 0x00);
}

static void test_nested_infotables(void **state)
{
    (void)state;
    unsigned depths[] = {1, 2, 3, EMX_AO_INFOTABLE_MAX_DEPTH - 1, EMX_AO_INFOTABLE_MAX_DEPTH};
    for (size_t i = 0; i < sizeof(depths) / sizeof(depths[0]); i++) {
        struct bb it = {.n = 0};
        it_nested(&it, depths[i]);
        size_t used = 0;
        assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, &used), EMX_AO_OK);
        assert_int_equal(used, it.n);
        struct emx_ao_reader r = {it.b, it.n, 0};
        assert_int_equal(emx_ao_skip_infotable(&r, 0), EMX_AO_OK);
        assert_int_equal(r.pos, it.n);
    }

    /* Depth 2 as the visitor sees it: the nested table is one opaque value. */
    struct bb two = {.n = 0};
    it_nested(&two, 2);
    struct seen s = {.stop_at = -1};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    assert_int_equal(emx_ao_walk_infotable(two.b, two.n, &vis, NULL), EMX_AO_OK);
    assert_int_equal(s.fields, 1);
    assert_int_equal(s.field_type[0], EMX_BT_INFOTABLE);
    assert_int_equal(s.values, 1);
    assert_int_equal(s.value_type[0], EMX_BT_INFOTABLE);
    assert_int_equal(emx_ao_walk_infotable(s.value_ptr[0], s.value_len[0], NULL, NULL), EMX_AO_OK);

    /* One level over the limit. */
    struct bb over = {.n = 0};
    it_nested(&over, EMX_AO_INFOTABLE_MAX_DEPTH + 1);
    assert_int_equal(emx_ao_walk_infotable(over.b, over.n, NULL, NULL), EMX_AO_EDEPTH);
    struct emx_ao_reader r = {over.b, over.n, 0};
    assert_int_equal(emx_ao_skip_infotable(&r, 0), EMX_AO_EDEPTH);
    /* A table at the limit is refused when it starts deeper. */
    struct bb lim = {.n = 0};
    it_nested(&lim, EMX_AO_INFOTABLE_MAX_DEPTH);
    r = (struct emx_ao_reader){lim.b, lim.n, 0};
    assert_int_equal(emx_ao_skip_infotable(&r, 1), EMX_AO_EDEPTH);

    /* Far over the limit, in a request: refused, no stack blow-up. */
    struct bb deep = {.n = 0};
    bb_u8(&deep, 0x0A);
    bb_str(&deep, "T");
    bb_u8(&deep, 0x02);
    bb_str(&deep, "s");
    bb_u8(&deep, 0x00);
    bb_u8(&deep, 0x05);
    it_nested(&deep, 100);
    struct emx_ao_request rq;
    assert_int_equal(emx_ao_request_parse(deep.b, deep.n, &rq), EMX_AO_EDEPTH);

    /* Every prefix of a nested table is refused. */
    for (size_t k = 0; k < two.n; k++) {
        uint8_t *copy = malloc(k ? k : 1);
        assert_non_null(copy);
        memcpy(copy, two.b, k);
        assert_true(emx_ao_walk_infotable(copy, k, NULL, NULL) < 0);
        free(copy);
    }
}

/* A table with one row holding `n` VARIANTs nested in each other around an
 * INTEGER. */
static void it_variants(struct bb *b, unsigned n)
{
    bb_u8(b, 0x01);
    bb_str(b, "v");
    bb_u8(b, 0x00);
    bb_u8(b, EMX_BT_VARIANT);
    bb_u16(b, 0);
    bb_u8(b, 0x00);
    bb_u8(b, 0x01);
    bb_u16(b, 1);
    for (unsigned i = 0; i < n; i++)
        bb_u8(b, EMX_BT_VARIANT);
    bb_u8(b, EMX_BT_INTEGER);
    bb_u32(b, 7);
    bb_u8(b, 0x00);
}

static void test_variant_depth(void **state)
{
    (void)state;
    /* Row values sit at depth 1; each VARIANT adds one level. */
    struct bb ok = {.n = 0};
    it_variants(&ok, EMX_AO_INFOTABLE_MAX_DEPTH - 1);
    assert_int_equal(emx_ao_walk_infotable(ok.b, ok.n, NULL, NULL), EMX_AO_OK);
    struct bb over = {.n = 0};
    it_variants(&over, EMX_AO_INFOTABLE_MAX_DEPTH);
    assert_int_equal(emx_ao_walk_infotable(over.b, over.n, NULL, NULL), EMX_AO_EDEPTH);
    struct bb far = {.n = 0};
    it_variants(&far, 1000);
    assert_int_equal(emx_ao_walk_infotable(far.b, far.n, NULL, NULL), EMX_AO_EDEPTH);

    /* skip_primitive directly. */
    static const uint8_t var_int[] = {EMX_BT_INTEGER, 0, 0, 0, 1};
    struct emx_ao_reader r = {var_int, sizeof(var_int), 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_VARIANT, 0), EMX_AO_OK);
    assert_int_equal(r.pos, 5);
    r = (struct emx_ao_reader){var_int, sizeof(var_int), 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_VARIANT, EMX_AO_INFOTABLE_MAX_DEPTH),
                     EMX_AO_EDEPTH);
    r = (struct emx_ao_reader){var_int, 4, 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_VARIANT, 0), EMX_AO_ETRUNC);
    r = (struct emx_ao_reader){var_int, 0, 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_VARIANT, 0), EMX_AO_ETRUNC);
}

/* One typed value of `t` and the size of its value (without type byte). */
static size_t put_value(struct bb *b, uint8_t t)
{
    size_t start = b->n;
    switch (t) {
    case EMX_BT_NOTHING:
        break;
    case EMX_BT_NUMBER:
        bb_double(b, 3.25);
        break;
    case EMX_BT_BOOLEAN:
        bb_u8(b, 1);
        break;
    case EMX_BT_DATETIME:
    case EMX_BT_TIMESPAN:
        bb_u32(b, 0x00000190);
        bb_u32(b, 0x12345678);
        break;
    case EMX_BT_INTEGER:
        bb_u32(b, 0xFFFFFFFE);
        break;
    case EMX_BT_LOCATION:
        bb_double(b, 42.36);
        bb_double(b, -71.06);
        bb_double(b, 12.0);
        break;
    case EMX_BT_BLOB:
    case EMX_BT_IMAGE:
        bb_u32(b, 5);
        bb_bytes(b, "\x89PNG\x00", 5);
        break;
    case EMX_BT_INFOTABLE:
        it_nested(b, 1);
        break;
    case EMX_BT_VARIANT:
        bb_u8(b, EMX_BT_BOOLEAN);
        bb_u8(b, 0);
        break;
    default: /* the string types */
        bb_str(b, "text");
        break;
    }
    return b->n - start;
}

static const uint8_t all_types[] = {
    EMX_BT_NOTHING,
    EMX_BT_STRING,
    EMX_BT_NUMBER,
    EMX_BT_BOOLEAN,
    EMX_BT_DATETIME,
    EMX_BT_TIMESPAN,
    EMX_BT_INFOTABLE,
    EMX_BT_LOCATION,
    EMX_BT_XML,
    EMX_BT_JSON,
    EMX_BT_QUERY,
    EMX_BT_IMAGE,
    EMX_BT_HYPERLINK,
    EMX_BT_IMAGELINK,
    EMX_BT_PASSWORD,
    EMX_BT_HTML,
    EMX_BT_TEXT,
    EMX_BT_TAGS,
    EMX_BT_SCHEDULE,
    EMX_BT_VARIANT,
    EMX_BT_GUID,
    EMX_BT_BLOB,
    EMX_BT_INTEGER,
    EMX_BT_PROPERTYNAME,
    EMX_BT_SERVICENAME,
    EMX_BT_EVENTNAME,
    100,
    101,
    113,
    126,
    127,
};

static void test_every_base_type(void **state)
{
    (void)state;
    size_t nt = sizeof(all_types);
    struct bb it = {.n = 0};
    size_t sizes[sizeof(all_types)];
    for (size_t i = 0; i < nt; i++) {
        bb_u8(&it, 0x01);
        bb_str(&it, "f");
        bb_u8(&it, 0x00);
        bb_u8(&it, all_types[i]);
        bb_u16(&it, 0);
    }
    bb_u8(&it, 0x00);
    for (int row = 0; row < 2; row++) {
        bb_u8(&it, 0x01);
        bb_u16(&it, (uint16_t)nt);
        for (size_t i = 0; i < nt; i++) {
            bb_u8(&it, all_types[i]);
            sizes[i] = put_value(&it, all_types[i]);
        }
    }
    bb_u8(&it, 0x00);

    struct seen s = {.stop_at = -1};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    size_t used = 0;
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, &vis, &used), EMX_AO_OK);
    assert_int_equal(used, it.n);
    assert_int_equal(s.fields, (int)nt);
    assert_int_equal(s.rows, 2);
    assert_int_equal(s.row_fields, nt);
    assert_int_equal(s.values, 2 * (int)nt);
    for (size_t i = 0; i < nt; i++) {
        assert_int_equal(s.field_type[i], all_types[i]);
        assert_int_equal(s.value_type[i], all_types[i]);
        assert_int_equal(s.value_len[i], sizes[i]);
    }
    /* Fixed sizes as the protocol states them. */
    assert_int_equal(sizes[2], 8);  /* NUMBER */
    assert_int_equal(sizes[3], 1);  /* BOOLEAN */
    assert_int_equal(sizes[4], 8);  /* DATETIME */
    assert_int_equal(sizes[5], 8);  /* TIMESPAN */
    assert_int_equal(sizes[7], 24); /* LOCATION */
    assert_int_equal(sizes[22], 4); /* INTEGER */
    assert_int_equal(sizes[0], 0);  /* NOTHING */

    for (size_t k = 0; k < it.n; k++) {
        uint8_t *copy = malloc(k ? k : 1);
        assert_non_null(copy);
        memcpy(copy, it.b, k);
        assert_true(emx_ao_walk_infotable(copy, k, NULL, NULL) < 0);
        free(copy);
    }

    /* Each type alone through skip_primitive, then each truncation. */
    for (size_t i = 0; i < nt; i++) {
        struct bb one = {.n = 0};
        size_t n = put_value(&one, all_types[i]);
        struct emx_ao_reader r = {one.b, one.n, 0};
        assert_int_equal(emx_ao_skip_primitive(&r, all_types[i], 0), EMX_AO_OK);
        assert_int_equal(r.pos, n);
        for (size_t k = 0; k < n; k++) {
            r = (struct emx_ao_reader){one.b, k, 0};
            assert_true(emx_ao_skip_primitive(&r, all_types[i], 0) < 0);
        }
    }
}

static void test_unknown_base_type(void **state)
{
    (void)state;
    static const uint8_t unknown[] = {19, 23, 49, 53, 99, 128, 200, 0xFE};
    for (size_t i = 0; i < sizeof(unknown); i++) {
        uint8_t t = unknown[i];
        struct emx_ao_reader r = {(const uint8_t *)"abcdefgh", 8, 0};
        assert_int_equal(emx_ao_skip_primitive(&r, t, 0), EMX_AO_ETYPE);

        /* in a row */
        struct bb it = {.n = 0};
        bb_u8(&it, 0x00);
        bb_u8(&it, 0x01);
        bb_u16(&it, 1);
        bb_u8(&it, t);
        bb_u32(&it, 0);
        bb_u8(&it, 0x00);
        assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_ETYPE);

        /* as a field's base type */
        struct bb f = {.n = 0};
        bb_u8(&f, 0x01);
        bb_str(&f, "x");
        bb_u8(&f, 0x00);
        bb_u8(&f, t);
        bb_u16(&f, 0);
        bb_u8(&f, 0x00);
        bb_u8(&f, 0x00);
        assert_int_equal(emx_ao_walk_infotable(f.b, f.n, NULL, NULL), EMX_AO_ETYPE);

        /* inside a VARIANT */
        struct bb var = {.n = 0};
        bb_u8(&var, t);
        bb_u32(&var, 0);
        r = (struct emx_ao_reader){var.b, var.n, 0};
        assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_VARIANT, 0), EMX_AO_ETYPE);
    }
}

static void test_infotable_aspects(void **state)
{
    (void)state;
    struct bb it = {.n = 0};
    bb_u8(&it, 0x01);
    bb_str(&it, "id");
    bb_str(&it, "primary key");
    bb_u8(&it, EMX_BT_INTEGER);
    bb_u16(&it, 2);
    bb_str(&it, "isPrimaryKey");
    bb_u8(&it, EMX_BT_BOOLEAN);
    bb_u8(&it, 1);
    bb_str(&it, "defaultValue");
    bb_u8(&it, EMX_BT_INTEGER);
    bb_u32(&it, 0);
    bb_u8(&it, 0x01);
    bb_str(&it, "name");
    bb_str(&it, "");
    bb_u8(&it, EMX_BT_STRING);
    bb_u16(&it, 0);
    bb_u8(&it, 0x00);
    bb_u8(&it, 0x00); /* no rows */

    struct seen s = {.stop_at = -1};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, &vis, NULL), EMX_AO_OK);
    assert_int_equal(s.fields, 2);
    assert_string_equal(s.field_name[0], "id");
    assert_string_equal(s.field_name[1], "name");
    assert_int_equal(s.rows, 0);
    for (size_t k = 0; k < it.n; k++)
        assert_true(emx_ao_walk_infotable(it.b, k, NULL, NULL) < 0);

    /* An aspect of unknown type. */
    it.b[1 + 3 + 12 + 1 + 2 + 13] = 19;
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_ETYPE);

    /* aspectCount larger than the aspects present. */
    struct bb more = {.n = 0};
    bb_u8(&more, 0x01);
    bb_str(&more, "a");
    bb_str(&more, "");
    bb_u8(&more, EMX_BT_STRING);
    bb_u16(&more, 0xFFFF);
    bb_str(&more, "x");
    bb_u8(&more, EMX_BT_STRING);
    bb_str(&more, "y");
    bb_u8(&more, 0x00);
    bb_u8(&more, 0x00);
    assert_true(emx_ao_walk_infotable(more.b, more.n, NULL, NULL) < 0);
}

static void test_infotable_markers(void **state)
{
    (void)state;
    struct bb it = {.n = 0};
    it_pressure(&it);
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_OK);
    /* A shape marker other than 0x00/0x01. */
    uint8_t save = it.b[0];
    for (unsigned m = 2; m < 256; m++) {
        it.b[0] = (uint8_t)m;
        assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_EBODY);
    }
    it.b[0] = save;
    /* A row marker other than 0x00/0x01: the row starts after the shape. */
    size_t row = 1 + 9 + 1 + 1 + 2 + 1;
    assert_int_equal(it.b[row], 0x01);
    it.b[row] = 0x02;
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_EBODY);
    it.b[row] = 0x01;
    /* The end marker of rows replaced. */
    it.b[it.n - 1] = 0x05;
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, NULL), EMX_AO_EBODY);

    /* The walker reports what it consumed, ignoring what follows. */
    it.b[it.n - 1] = 0x00;
    bb_u8(&it, 0xAB);
    size_t used = 0;
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, NULL, &used), EMX_AO_OK);
    assert_int_equal(used, it.n - 1);

    /* The empty table: no fields, no rows. */
    static const uint8_t empty[] = {0x00, 0x00};
    assert_int_equal(emx_ao_walk_infotable(empty, 2, NULL, &used), EMX_AO_OK);
    assert_int_equal(used, 2);
    assert_int_equal(emx_ao_walk_infotable(empty, 1, NULL, &used), EMX_AO_ETRUNC);
    assert_int_equal(emx_ao_walk_infotable(empty, 0, NULL, &used), EMX_AO_ETRUNC);
}

static void test_walker_stops(void **state)
{
    (void)state;
    struct bb it = {.n = 0};
    it_pressure(&it);
    struct seen s = {.stop_at = 0};
    struct emx_ao_infotable_visitor vis = {on_field, on_row, on_value, &s};
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, &vis, NULL), 7);
    assert_int_equal(s.fields, 1);
    assert_int_equal(s.values, 0);
    /* A visitor with no callbacks is a validator. */
    struct emx_ao_infotable_visitor none = {NULL, NULL, NULL, NULL};
    assert_int_equal(emx_ao_walk_infotable(it.b, it.n, &none, NULL), EMX_AO_OK);
}

static void test_blob_past_end(void **state)
{
    (void)state;
    static const uint8_t blob[] = {0x00, 0x00, 0x10, 0x00, 1, 2, 3};
    static const uint8_t huge[] = {0xFF, 0xFF, 0xFF, 0xFF, 1};
    struct emx_ao_reader r = {blob, sizeof(blob), 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_BLOB, 0), EMX_AO_ETRUNC);
    r = (struct emx_ao_reader){huge, sizeof(huge), 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_IMAGE, 0), EMX_AO_ETRUNC);
    r = (struct emx_ao_reader){huge, sizeof(huge), 0};
    assert_int_equal(emx_ao_skip_primitive(&r, EMX_BT_STRING, 0), EMX_AO_ETRUNC);
    /* rows claim more fields than they hold */
    struct bb it = {.n = 0};
    bb_u8(&it, 0x00);
    bb_u8(&it, 0x01);
    bb_u16(&it, 0xFFFF);
    bb_u8(&it, EMX_BT_BOOLEAN);
    bb_u8(&it, 1);
    bb_u8(&it, 0x00);
    assert_true(emx_ao_walk_infotable(it.b, it.n, NULL, NULL) < 0);
}

/* ---- bodies ---- */

static void test_request_headers(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    bb_u8(&v, 0x0A);
    bb_str(&v, "SteamSensor");
    bb_u8(&v, 0x02);
    bb_str(&v, "GetReadings");
    bb_u8(&v, 2);
    bb_str(&v, "Content-Type");
    bb_str(&v, "binary");
    bb_str(&v, "x-trace");
    bb_str(&v, "");
    bb_u8(&v, 0xFF);
    struct emx_ao_request rq;
    assert_int_equal(emx_ao_request_parse(v.b, v.n, &rq), EMX_AO_OK);
    assert_int_equal(rq.header_count, 2);
    assert_int_equal(rq.headers_len, 13 + 7 + 8 + 1);
    assert_ptr_equal(rq.headers, v.b + 1 + 12 + 1 + 12 + 1);
    assert_false(rq.has_params);
    for (size_t k = 0; k < v.n; k++)
        assert_true(emx_ao_request_parse(v.b, k, &rq) < 0);

    /* headerCount beyond the headers present */
    v.b[1 + 12 + 1 + 12] = 3;
    assert_int_equal(emx_ao_request_parse(v.b, v.n, &rq), EMX_AO_ETRUNC);
    v.b[1 + 12 + 1 + 12] = 2;
    /* params marker neither 0x05 nor 0xFF */
    v.b[v.n - 1] = 0x00;
    assert_int_equal(emx_ao_request_parse(v.b, v.n, &rq), EMX_AO_EBODY);
    v.b[v.n - 1] = 0xFF;
    bb_u8(&v, 0x00);
    assert_int_equal(emx_ao_request_parse(v.b, v.n, &rq), EMX_AO_ETRAIL);
}

static void test_response_bodies(void **state)
{
    (void)state;
    struct emx_ao_response r;
    static const uint8_t ok[] = {0x00, 0xFF};
    assert_int_equal(emx_ao_response_parse(ok, 2, &r), EMX_AO_OK);
    static const uint8_t reason[] = {0x01, 0x03, 'b', 'a', 'd', 0xFF};
    assert_int_equal(emx_ao_response_parse(reason, sizeof(reason), &r), EMX_AO_OK);
    assert_true(r.has_reason);
    assert_true(emx_ao_str_eq(r.reason, "bad"));
    for (size_t k = 0; k < sizeof(reason); k++)
        assert_true(emx_ao_response_parse(reason, k, &r) < 0);

    for (unsigned m = 2; m < 256; m++) {
        uint8_t bad[] = {(uint8_t)m, 0xFF};
        assert_int_equal(emx_ao_response_parse(bad, 2, &r), EMX_AO_EBODY);
    }
    static const uint8_t bad_content[] = {0x00, 0x04};
    assert_int_equal(emx_ao_response_parse(bad_content, 2, &r), EMX_AO_EBODY);
    static const uint8_t trail[] = {0x00, 0xFF, 0x00};
    assert_int_equal(emx_ao_response_parse(trail, 3, &r), EMX_AO_ETRAIL);
    static const uint8_t reason_past[] = {0x01, 0x40, 'x', 0xFF};
    assert_int_equal(emx_ao_response_parse(reason_past, sizeof(reason_past), &r), EMX_AO_ETRUNC);
    /* content present but its InfoTable is cut */
    static const uint8_t cut[] = {0x00, 0x05, 0x00};
    assert_int_equal(emx_ao_response_parse(cut, sizeof(cut), &r), EMX_AO_ETRUNC);
}

static void test_auth_bodies(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    bb_u8(&v, 3);
    bb_str(&v, "userid");
    bb_str(&v, "admin");
    bb_str(&v, "appKey");
    bb_str(&v, "k1");
    bb_str(&v, "appKey");
    bb_str(&v, "k2");
    uint8_t n = 0;
    assert_int_equal(emx_ao_auth_parse(v.b, v.n, &n), EMX_AO_OK);
    assert_int_equal(n, 3);
    assert_int_equal(emx_ao_auth_parse(v.b, v.n, NULL), EMX_AO_OK);
    struct emx_ao_str val;
    assert_int_equal(emx_ao_auth_find_claim(v.b, v.n, "appKey", &val), EMX_AO_OK);
    assert_true(emx_ao_str_eq(val, "k1")); /* the first wins */
    assert_int_equal(emx_ao_auth_find_claim(v.b, v.n, "userid", &val), EMX_AO_OK);
    assert_true(emx_ao_str_eq(val, "admin"));
    assert_int_equal(emx_ao_auth_find_claim(v.b, v.n, "appkey", &val), EMX_AO_EBODY);
    for (size_t k = 0; k < v.n; k++) {
        assert_true(emx_ao_auth_parse(v.b, k, &n) < 0);
        int rc = emx_ao_auth_find_claim(v.b, k, "appKey", &val);
        assert_true(rc < 0 && rc != EMX_AO_EBODY);
    }
    /* A malformed body is not "claim missing". */
    bb_u8(&v, 0x00);
    assert_int_equal(emx_ao_auth_parse(v.b, v.n, &n), EMX_AO_ETRAIL);
    assert_int_equal(emx_ao_auth_find_claim(v.b, v.n, "appKey", &val), EMX_AO_ETRAIL);
    /* No claims at all. */
    static const uint8_t none[] = {0x00};
    assert_int_equal(emx_ao_auth_parse(none, 1, &n), EMX_AO_OK);
    assert_int_equal(n, 0);
    assert_int_equal(emx_ao_auth_find_claim(none, 1, "appKey", &val), EMX_AO_EBODY);
    /* claimCount beyond the claims present */
    static const uint8_t more[] = {0x02, 0x01, 'a', 0x01, 'b'};
    assert_int_equal(emx_ao_auth_parse(more, sizeof(more), &n), EMX_AO_ETRUNC);
}

static void test_bind_bodies(void **state)
{
    (void)state;
    struct bb v = {.n = 0};
    bb_u8(&v, 0x01);
    bb_str(&v, "gw-7");
    bb_str(&v, "EdgeGateway");
    bb_u16(&v, 3);
    bb_str(&v, "A");
    bb_str(&v, "");
    char long_name[300];
    memset(long_name, 'n', sizeof(long_name));
    uint8_t tmp[320];
    size_t ln = emx_ao_write_str(tmp, sizeof(tmp), long_name, sizeof(long_name));
    assert_int_equal(ln, 304);
    bb_bytes(&v, tmp, ln);

    struct emx_ao_bind bd;
    assert_int_equal(emx_ao_bind_parse(v.b, v.n, &bd), EMX_AO_OK);
    assert_true(bd.has_gateway);
    assert_true(emx_ao_str_eq(bd.gateway_name, "gw-7"));
    assert_true(emx_ao_str_eq(bd.gateway_type, "EdgeGateway"));
    assert_int_equal(bd.count, 3);
    size_t cur = 0;
    struct emx_ao_str s;
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), EMX_AO_OK);
    assert_true(emx_ao_str_eq(s, "A"));
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), EMX_AO_OK);
    assert_int_equal(s.len, 0);
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), EMX_AO_OK);
    assert_int_equal(s.len, 300);
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), 1);
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), 1);
    for (size_t k = 0; k < v.n; k++) {
        uint8_t *copy = malloc(k ? k : 1);
        assert_non_null(copy);
        memcpy(copy, v.b, k);
        assert_true(emx_ao_bind_parse(copy, k, &bd) < 0);
        free(copy);
    }

    v.b[0] = 0x02;
    assert_int_equal(emx_ao_bind_parse(v.b, v.n, &bd), EMX_AO_EBODY);
    v.b[0] = 0x01;
    bb_u8(&v, 0x00);
    assert_int_equal(emx_ao_bind_parse(v.b, v.n, &bd), EMX_AO_ETRAIL);

    /* count 0: an UNBIND of nothing */
    static const uint8_t empty[] = {0x00, 0x00, 0x00};
    assert_int_equal(emx_ao_bind_parse(empty, 3, &bd), EMX_AO_OK);
    assert_int_equal(bd.count, 0);
    cur = 0;
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), 1);
    /* count beyond the names present */
    static const uint8_t more[] = {0x00, 0x00, 0x02, 0x01, 'a'};
    assert_int_equal(emx_ao_bind_parse(more, sizeof(more), &bd), EMX_AO_ETRUNC);
}

static void test_multipart_prefix_errors(void **state)
{
    (void)state;
    uint8_t et;
    struct emx_ao_str en;
    size_t po = 99;
    static const uint8_t only[] = {0x0A, 0x01, 'T'};
    assert_int_equal(emx_ao_multipart_prefix_parse(only, sizeof(only), &et, &en, &po), EMX_AO_OK);
    assert_int_equal(po, 3);
    assert_int_equal(emx_ao_multipart_prefix_parse(only, 2, &et, &en, &po), EMX_AO_ETRUNC);
    assert_int_equal(emx_ao_multipart_prefix_parse(only, 1, &et, &en, &po), EMX_AO_ETRUNC);
    assert_int_equal(emx_ao_multipart_prefix_parse(only, 0, &et, &en, &po), EMX_AO_ETRUNC);
    static const uint8_t past[] = {0x0A, 0x80, 0x00, 0x10, 0x00, 'T'};
    assert_int_equal(emx_ao_multipart_prefix_parse(past, sizeof(past), &et, &en, &po),
                     EMX_AO_ETRUNC);
}

/* ---- builders ---- */

/* Every cap below the full size gives 0 and writes nothing past cap. */
#define CHECK_CAPS(full, call_with_cap)                                                            \
    do {                                                                                           \
        for (size_t cap = 0; cap < (full); cap++) {                                                \
            uint8_t canvas[600];                                                                   \
            memset(canvas, 0xEE, sizeof(canvas));                                                  \
            uint8_t *buf = canvas;                                                                 \
            assert_int_equal((call_with_cap), 0);                                                  \
            for (size_t j = cap; j < sizeof(canvas); j++)                                          \
                assert_int_equal(canvas[j], 0xEE);                                                 \
        }                                                                                          \
    } while (0)

static void test_builders_small_cap(void **state)
{
    (void)state;
    uint8_t full[600];
    size_t n;

    n = emx_ao_build_response(full, sizeof(full), EMX_AO_BAD_REQUEST, 1, 2, 3,
                              "Message Type not supported");
    assert_int_equal(n, 15 + 1 + 27 + 1);
    assert_true(n <= emx_ao_response_size(26));
    CHECK_CAPS(n, emx_ao_build_response(buf, cap, EMX_AO_BAD_REQUEST, 1, 2, 3,
                                        "Message Type not supported"));
    n = emx_ao_build_response(full, sizeof(full), EMX_AO_SUCCESS, 1, 2, 3, NULL);
    assert_int_equal(n, 17);
    CHECK_CAPS(n, emx_ao_build_response(buf, cap, EMX_AO_SUCCESS, 1, 2, 3, NULL));

    n = emx_ao_build_auth(full, sizeof(full), 0x80000000u, 5, APP_KEY, 36);
    assert_int_equal(n, 60);
    CHECK_CAPS(n, emx_ao_build_auth(buf, cap, 0x80000000u, 5, APP_KEY, 36));

    struct emx_ao_str names[] = {{(const uint8_t *)"A", 1}, {(const uint8_t *)"Bee", 3}};
    n = emx_ao_build_bind(full, sizeof(full), EMX_AO_UNBIND, 0x80000001u, 5, 9, names, 2);
    assert_int_equal(n, 15 + 1 + 2 + 2 + 4);
    CHECK_CAPS(n, emx_ao_build_bind(buf, cap, EMX_AO_UNBIND, 0x80000001u, 5, 9, names, 2));

    struct bb it = {.n = 0};
    it_fault(&it);
    n = emx_ao_build_request(full, sizeof(full), EMX_AO_POST, 1, 2, 3, 0x0A, "SteamSensor", 0x03,
                             "SteamSensorFault", it.b, it.n);
    assert_true(n > 0);
    CHECK_CAPS(n, emx_ao_build_request(buf, cap, EMX_AO_POST, 1, 2, 3, 0x0A, "SteamSensor", 0x03,
                                       "SteamSensorFault", it.b, it.n));
}

static void test_builders_args(void **state)
{
    (void)state;
    uint8_t out[600];
    struct emx_ao_str names[] = {{(const uint8_t *)"A", 1}};
    assert_int_equal(emx_ao_build_bind(out, sizeof(out), EMX_AO_GET, 1, 2, 3, names, 1), 0);
    assert_int_equal(emx_ao_build_bind(out, sizeof(out), EMX_AO_BIND, 1, 2, 3, NULL, 1), 0);
    assert_int_equal(emx_ao_build_bind(out, sizeof(out), EMX_AO_BIND, 1, 2, 3, names, 70000), 0);
    size_t n = emx_ao_build_bind(out, sizeof(out), EMX_AO_UNBIND, 1, 2, 3, NULL, 0);
    assert_int_equal(n, 18);
    assert_int_equal(
        emx_ao_build_request(out, sizeof(out), EMX_AO_SUCCESS, 1, 2, 3, 0x0A, "T", 1, "p", NULL, 0),
        0);
    assert_int_equal(
        emx_ao_build_request(out, sizeof(out), EMX_AO_GET, 1, 2, 3, 0x0A, NULL, 1, "p", NULL, 0),
        0);

    /* The UNBIND edgemux sends on leave parses back. */
    struct emx_ao_str many[3] = {
        {(const uint8_t *)"One", 3}, {(const uint8_t *)"Two", 3}, {(const uint8_t *)"Three", 5}};
    n = emx_ao_build_bind(out, sizeof(out), EMX_AO_UNBIND, 0x80000002u, 0x10000007u, 0x1234ABCD,
                          many, 3);
    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(out, n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_UNBIND);
    assert_int_equal(h.request_id, 0x80000002u);
    assert_int_equal(h.endpoint_id, 0x10000007u);
    struct emx_ao_bind bd;
    assert_int_equal(emx_ao_bind_parse(out + off, n - off, &bd), EMX_AO_OK);
    assert_int_equal(bd.count, 3);
    size_t cur = 0;
    struct emx_ao_str s;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), EMX_AO_OK);
        assert_int_equal(s.len, many[i].len);
        assert_memory_equal(s.ptr, many[i].ptr, s.len);
    }
    assert_int_equal(emx_ao_bind_next_name(&bd, &cur, &s), 1);

    /* An AUTH with a long key uses the long string form. */
    char key[200];
    memset(key, 'k', sizeof(key));
    n = emx_ao_build_auth(out, sizeof(out), 1, 0, key, sizeof(key));
    assert_int_equal(n, 15 + 1 + 7 + 4 + 200);
    struct emx_ao_str val;
    assert_int_equal(emx_ao_auth_find_claim(out + 15, n - 15, "appKey", &val), EMX_AO_OK);
    assert_int_equal(val.len, 200);
}

static void test_edgemux_answers(void **state)
{
    (void)state;
    static const struct {
        uint8_t code;
        const char *reason;
    } answers[] = {
        {EMX_AO_SUCCESS, NULL}, /* KEEP_ALIVE */
        {EMX_AO_BAD_REQUEST, "Message Type not supported"},
        {EMX_AO_ENTITY_TOO_LARGE, "message too large"},
        {EMX_AO_INTERNAL_ERROR, "no platform instance available"},
        {EMX_AO_SERVICE_UNAVAILABLE, "too many pending"},
        {EMX_AO_GATEWAY_TIMEOUT, "request timed out"},
        {EMX_AO_INTERNAL_ERROR, NULL},
        {EMX_AO_SERVICE_UNAVAILABLE, ""},
    };
    for (size_t i = 0; i < sizeof(answers) / sizeof(answers[0]); i++) {
        uint8_t out[128];
        const char *why = answers[i].reason;
        size_t n = emx_ao_build_response(out, sizeof(out), answers[i].code, 0x00000011, 0,
                                         0x1234ABCD, why);
        assert_true(n > 0);
        assert_true(n <= emx_ao_response_size(why ? strlen(why) : 0));
        struct emx_ao_header h;
        size_t off;
        assert_int_equal(emx_ao_header_parse(out, n, &h, &off), EMX_AO_OK);
        assert_int_equal(h.code, answers[i].code);
        assert_true(emx_ao_is_response(h.code));
        assert_int_equal(h.request_id, 0x11);
        assert_int_equal(h.endpoint_id, 0);
        assert_int_equal(h.session_id, 0x1234ABCD);
        assert_false(h.multipart);
        struct emx_ao_response r;
        assert_int_equal(emx_ao_response_parse(out + off, n - off, &r), EMX_AO_OK);
        assert_false(r.has_content);
        if (why) {
            assert_true(r.has_reason);
            assert_true(emx_ao_str_eq(r.reason, why));
        } else {
            assert_false(r.has_reason);
            assert_int_equal(n, 17);
        }
        check_all_prefixes(out, n);
    }

    /* A reason of 128 bytes or more takes the long form. */
    char why[200];
    memset(why, 'r', sizeof(why) - 1);
    why[sizeof(why) - 1] = '\0';
    uint8_t out[300];
    size_t n = emx_ao_build_response(out, sizeof(out), EMX_AO_GATEWAY_TIMEOUT, 1, 2, 3, why);
    assert_int_equal(n, emx_ao_response_size(199));
    assert_int_equal(out[16], 0x80);
    struct emx_ao_response r;
    assert_int_equal(emx_ao_response_parse(out + 15, n - 15, &r), EMX_AO_OK);
    assert_int_equal(r.reason.len, 199);
}

/* Every vector with one byte more is refused as trailing, or (multipart) not. */
static void test_trailing_bytes(void **state)
{
    (void)state;
    void (*vecs[])(struct bb *) = {vec_auth,      vec_bind,    vec_get,
                                   vec_not_found, vec_success, vec_post};
    for (size_t i = 0; i < sizeof(vecs) / sizeof(vecs[0]); i++) {
        struct bb v = {.n = 0};
        vecs[i](&v);
        bb_u8(&v, 0x00);
        assert_int_equal(parse_message(v.b, v.n), EMX_AO_ETRAIL);
    }
}

/* ---- Remote Access tunnel control services (TUNNELS.md §3.1, §5) ---- */

/* The StartTunnel the test platform sent (198 bytes), as TUNNELS.md §3.1
 * shows it. */
static const char TUN_START_HEX[] =
    "0103000003e8000000004761c29e000a0b537465616d53656e736f72020b5374"
    "61727454756e6e656c0005010374696400000000010474797065000000000109"
    "6368756e6b73697a6500160000010c69646c655f74696d656f75740016000001"
    "0c726561645f74696d656f757400160000010a636f6e6e656374696f6e000000"
    "0000010006000574756e2d31000374637016000020001600007530160000000a"
    "00237b22686f7374223a20223132372e302e302e31222c2022706f7274223a20"
    "373737377d00";
/* The device's TunnelCommandFromEdge CANCEL (95 bytes), TUNNELS.md §5. */
static const char TUN_CANCEL_HEX[] =
    "010300000006000000004761c29e000a0b537465616d53656e736f7202155475"
    "6e6e656c436f6d6d616e6446726f6d4564676500050103746964000000000107"
    "636f6d6d616e640000000000010002000574756e2d31000643414e43454c00";
/* CompleteTunnel: tid, peer_name, connection {"reason": "test done"}. */
static const char TUN_COMPLETE_HEX[] =
    "0103000003ea000000004761c29e000a0b537465616d53656e736f72020e436f"
    "6d706c65746554756e6e656c00050103746964000000000109706565725f6e61"
    "6d6500000000010a636f6e6e656374696f6e0000000000010003000574756e2d"
    "31000a706c6174666f726d2d3100177b22726561736f6e223a20227465737420"
    "646f6e65227d00";
/* TunnelCommandToEdge CONNECT. */
static const char TUN_TO_EDGE_HEX[] =
    "0103000003e9000000004761c29e000a0b537465616d53656e736f7202135475"
    "6e6e656c436f6d6d616e64546f4564676500050103746964000000000107636f"
    "6d6d616e640000000000010002000574756e2d310007434f4e4e45435400";

static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    assert_true(n <= cap);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
        out[i] = (uint8_t)v;
    }
    return n;
}

static bool str_is(struct emx_ao_str s, const char *want)
{
    return s.ptr != NULL && emx_ao_str_eq(s, want);
}

/* Every prefix of the body, in an exactly-sized heap copy, is refused or
 * (a prefix that ends before the service name) leaves the service unknown;
 * none reads past its end. */
static void tunnel_truncations(const uint8_t *body, size_t len)
{
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *copy = malloc(cut ? cut : 1);
        assert_non_null(copy);
        memcpy(copy, body, cut);
        struct emx_ao_tunnel_msg m;
        int rc = emx_ao_tunnel_parse(copy, cut, &m);
        assert_true(rc < 0);
        free(copy);
    }
}

static void test_tunnel_start_vector(void **state)
{
    (void)state;
    uint8_t buf[512];
    size_t n = unhex(TUN_START_HEX, buf, sizeof(buf));
    assert_int_equal(n, 198);
    struct emx_ao_header h;
    size_t off;
    assert_int_equal(emx_ao_header_parse(buf, n, &h, &off), EMX_AO_OK);
    assert_int_equal(h.code, EMX_AO_POST);
    assert_int_equal(h.request_id, 1000);
    assert_int_equal(h.session_id, 0x4761C29E);
    struct emx_ao_tunnel_msg m;
    assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_START);
    assert_string_equal(emx_ao_tunnel_service_name(m.service), "StartTunnel");
    assert_int_equal(m.entity_type, 0x0A);
    assert_true(str_is(m.thing, "SteamSensor"));
    assert_true(str_is(m.tid, "tun-1"));
    assert_true(str_is(m.type, "tcp"));
    assert_true(str_is(m.connection, "{\"host\": \"127.0.0.1\", \"port\": 7777}"));
    assert_null(m.command.ptr);
    assert_null(m.peer_name.ptr);
    assert_true(m.has_chunksize && m.has_idle_timeout && m.has_read_timeout);
    assert_int_equal(m.chunksize, 8192);
    assert_int_equal(m.idle_timeout, 30000);
    assert_int_equal(m.read_timeout, 10);
    struct emx_ao_str host;
    uint16_t port = 0;
    assert_int_equal(emx_ao_tunnel_target(m.connection, &host, &port), EMX_AO_OK);
    assert_true(str_is(host, "127.0.0.1"));
    assert_int_equal(port, 7777);
    tunnel_truncations(buf + off, n - off);
    /* One byte more is trailing garbage. */
    buf[n] = 0;
    assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off + 1, &m), EMX_AO_ETRAIL);
    assert_int_equal(m.service, EMX_AO_TUNNEL_START);
}

/* The tid is replaced in place of its value, by a longer one (its length
 * prefix grows from 1 to 4 bytes past 127) and a shorter one; every other
 * field parses the same, and a message without a tid is not rewritten. */
static void test_tunnel_with_tid(void **state)
{
    (void)state;
    const char *vectors[] = {TUN_START_HEX, TUN_CANCEL_HEX, TUN_COMPLETE_HEX, TUN_TO_EDGE_HEX};
    char big[200];
    memset(big, 'z', sizeof(big));
    for (size_t v = 0; v < 4; v++) {
        uint8_t buf[512], out[1024];
        size_t n = unhex(vectors[v], buf, sizeof(buf));
        size_t off = EMX_AO_HEADER_SIZE;
        struct emx_ao_tunnel_msg m, m2;
        assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off, &m), EMX_AO_OK);
        const char *tids[] = {"xdeadbeef~tun-1", "t", big};
        size_t lens[] = {15, 1, sizeof(big)};
        for (size_t t = 0; t < 3; t++) {
            size_t w = emx_ao_tunnel_with_tid(buf, n, &m, tids[t], lens[t], out, sizeof(out));
            assert_int_equal(w, n - 5 - 1 + lens[t] + (lens[t] < 128 ? 1 : 4));
            assert_memory_equal(out, buf, EMX_AO_HEADER_SIZE);
            assert_int_equal(emx_ao_tunnel_parse(out + off, w - off, &m2), EMX_AO_OK);
            assert_int_equal(m2.service, m.service);
            assert_int_equal(m2.tid.len, lens[t]);
            assert_memory_equal(m2.tid.ptr, tids[t], lens[t]);
            assert_int_equal(m2.command.len, m.command.len);
            assert_int_equal(m2.connection.len, m.connection.len);
            assert_int_equal(m2.chunksize, m.chunksize);
            /* too small an output buffer: nothing */
            assert_int_equal(emx_ao_tunnel_with_tid(buf, n, &m, tids[t], lens[t], out, w - 1), 0);
        }
        m.tid_value = NULL;
        assert_int_equal(emx_ao_tunnel_with_tid(buf, n, &m, "a", 1, out, sizeof(out)), 0);
    }
}

static void test_tunnel_control_vectors(void **state)
{
    (void)state;
    uint8_t buf[512];
    size_t off = EMX_AO_HEADER_SIZE;
    struct emx_ao_tunnel_msg m;

    size_t n = unhex(TUN_CANCEL_HEX, buf, sizeof(buf));
    assert_int_equal(n, 95);
    assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_COMMAND_FROM);
    assert_true(str_is(m.tid, "tun-1"));
    assert_true(str_is(m.command, "CANCEL"));
    assert_false(m.has_chunksize);
    tunnel_truncations(buf + off, n - off);

    n = unhex(TUN_COMPLETE_HEX, buf, sizeof(buf));
    assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_COMPLETE);
    assert_true(str_is(m.tid, "tun-1"));
    assert_true(str_is(m.peer_name, "platform-1"));
    assert_true(str_is(m.connection, "{\"reason\": \"test done\"}"));
    struct emx_ao_str host;
    uint16_t port;
    assert_int_equal(emx_ao_tunnel_target(m.connection, &host, &port), EMX_AO_EBODY);
    tunnel_truncations(buf + off, n - off);

    n = unhex(TUN_TO_EDGE_HEX, buf, sizeof(buf));
    assert_int_equal(emx_ao_tunnel_parse(buf + off, n - off, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_COMMAND_TO);
    assert_true(str_is(m.command, "CONNECT"));
    tunnel_truncations(buf + off, n - off);
}

static void test_tunnel_not_a_service(void **state)
{
    (void)state;
    struct emx_ao_tunnel_msg m;
    /* A property GET named like the service: not Services. */
    struct bb b = {.n = 0};
    bb_u8(&b, 0x0A);
    bb_str(&b, "SteamSensor");
    bb_u8(&b, 0x01); /* Properties */
    bb_str(&b, "StartTunnel");
    bb_u8(&b, 0);
    bb_u8(&b, 0xFF);
    assert_int_equal(emx_ao_tunnel_parse(b.b, b.n, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_NONE);
    /* Another service: only the prefix is read (garbage after it is not
     * this parser's concern). */
    b.n = 0;
    bb_u8(&b, 0x0A);
    bb_str(&b, "SteamSensor");
    bb_u8(&b, 0x02);
    bb_str(&b, "StartTunnelX");
    bb_u8(&b, 0x77);
    assert_int_equal(emx_ao_tunnel_parse(b.b, b.n, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_NONE);
    /* A tunnel service without params: recognised, no fields. */
    b.n = 0;
    bb_u8(&b, 0x0A);
    bb_str(&b, "SteamSensor");
    bb_u8(&b, 0x02);
    bb_str(&b, "StartTunnel");
    bb_u8(&b, 0);
    bb_u8(&b, 0xFF);
    assert_int_equal(emx_ao_tunnel_parse(b.b, b.n, &m), EMX_AO_OK);
    assert_int_equal(m.service, EMX_AO_TUNNEL_START);
    assert_null(m.tid.ptr);
    assert_int_equal(emx_ao_tunnel_parse(b.b, 0, &m), EMX_AO_ETRUNC);
}

/* Fields by name in any order, wrong base types left unset, only the first
 * row read, a duplicate field name: the first one counts. */
static void test_tunnel_fields(void **state)
{
    (void)state;
    struct bb b = {.n = 0};
    bb_u8(&b, 0x0A);
    bb_str(&b, "Pump");
    bb_u8(&b, 0x02);
    bb_str(&b, "StartTunnel");
    bb_u8(&b, 0);
    bb_u8(&b, 0x05);
    const char *names[] = {"chunksize", "extra", "tid", "type", "tid", "idle_timeout"};
    const uint8_t types[] = {EMX_BT_NUMBER,  EMX_BT_BOOLEAN, EMX_BT_STRING,
                             EMX_BT_INTEGER, EMX_BT_STRING,  EMX_BT_INTEGER};
    for (unsigned i = 0; i < 6; i++) {
        bb_u8(&b, 1);
        bb_str(&b, names[i]);
        bb_str(&b, "");
        bb_u8(&b, types[i]);
        bb_u16(&b, 0);
    }
    bb_u8(&b, 0);
    for (unsigned row = 0; row < 2; row++) {
        bb_u8(&b, 1);
        bb_u16(&b, 6);
        bb_u8(&b, EMX_BT_NUMBER); /* chunksize as NUMBER: not read */
        bb_double(&b, 8192.0);
        bb_u8(&b, EMX_BT_BOOLEAN);
        bb_u8(&b, 1);
        bb_u8(&b, EMX_BT_STRING);
        bb_str(&b, row ? "second-row" : "t-9");
        bb_u8(&b, EMX_BT_INTEGER); /* type as INTEGER: not read */
        bb_u32(&b, 7);
        bb_u8(&b, EMX_BT_STRING);
        bb_str(&b, "dup");
        bb_u8(&b, EMX_BT_INTEGER);
        bb_u32(&b, (uint32_t)-5);
    }
    bb_u8(&b, 0);
    struct emx_ao_tunnel_msg m;
    assert_int_equal(emx_ao_tunnel_parse(b.b, b.n, &m), EMX_AO_OK);
    assert_true(str_is(m.thing, "Pump"));
    assert_true(str_is(m.tid, "t-9"));
    assert_null(m.type.ptr);
    assert_false(m.has_chunksize);
    assert_true(m.has_idle_timeout);
    assert_int_equal(m.idle_timeout, -5);
}

static void test_tunnel_target_scanner(void **state)
{
    (void)state;
    struct {
        const char *json;
        int rc;
        const char *host;
        unsigned port;
    } cases[] = {
        {"{\"host\": \"127.0.0.1\", \"port\": 7777}", EMX_AO_OK, "127.0.0.1", 7777},
        {" { \"port\":22,\"num_connects\":-1,\"host\":\"dev.local\" } ", EMX_AO_OK, "dev.local",
         22},
        {"{\"message\":{\"host\":\"x\",\"a\":[1,\"}\"]},\"host\":\"h\",\"port\":1}", EMX_AO_OK, "h",
         1},
        {"{\"host\":\"a\\\"b\",\"port\":65535}", EMX_AO_OK, "a\\\"b", 65535},
        {"{\"host\":\"h\",\"port\":65536}", EMX_AO_EBODY, NULL, 0},
        {"{\"host\":\"h\",\"port\":99999999999999999999}", EMX_AO_EBODY, NULL, 0},
        {"{\"host\":\"h\",\"port\":\"22\"}", EMX_AO_EBODY, NULL, 0},
        {"{\"host\":\"h\"}", EMX_AO_EBODY, NULL, 0},
        {"{\"port\":22}", EMX_AO_EBODY, NULL, 0},
        {"[\"host\",\"port\"]", EMX_AO_EBODY, NULL, 0},
        {"", EMX_AO_EBODY, NULL, 0},
        {"{\"host\":\"h\",\"port\":22", EMX_AO_OK, "h", 22},
        {"{\"host\":\"h", EMX_AO_EBODY, NULL, 0},
        {"{\"a\":{{{{", EMX_AO_EBODY, NULL, 0},
    };
    for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = strlen(cases[i].json);
        /* Every prefix in an exactly-sized copy: never a read past it. */
        for (size_t cut = 0; cut <= len; cut++) {
            char *copy = malloc(cut ? cut : 1);
            assert_non_null(copy);
            memcpy(copy, cases[i].json, cut);
            struct emx_ao_str conn = {(const uint8_t *)copy, (uint32_t)cut}, host = {0};
            uint16_t port = 0;
            int rc = emx_ao_tunnel_target(conn, &host, &port);
            if (cut == len) {
                assert_int_equal(rc, cases[i].rc);
                if (rc == EMX_AO_OK) {
                    assert_true(str_is(host, cases[i].host));
                    assert_int_equal(port, cases[i].port);
                }
            }
            free(copy);
        }
    }
    struct emx_ao_str none = {NULL, 0}, host;
    uint16_t port;
    assert_int_equal(emx_ao_tunnel_target(none, &host, &port), EMX_AO_EBODY);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vector_auth),
        cmocka_unit_test(test_vector_bind),
        cmocka_unit_test(test_vector_get),
        cmocka_unit_test(test_vector_not_found),
        cmocka_unit_test(test_vector_success),
        cmocka_unit_test(test_vector_post_event),
        cmocka_unit_test(test_multipart_chunk),
        cmocka_unit_test(test_codes),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_header_errors),
        cmocka_unit_test(test_header_write),
        cmocka_unit_test(test_strings_short_long),
        cmocka_unit_test(test_strings_past_end),
        cmocka_unit_test(test_primitives),
        cmocka_unit_test(test_nested_infotables),
        cmocka_unit_test(test_variant_depth),
        cmocka_unit_test(test_every_base_type),
        cmocka_unit_test(test_unknown_base_type),
        cmocka_unit_test(test_infotable_aspects),
        cmocka_unit_test(test_infotable_markers),
        cmocka_unit_test(test_walker_stops),
        cmocka_unit_test(test_blob_past_end),
        cmocka_unit_test(test_request_headers),
        cmocka_unit_test(test_response_bodies),
        cmocka_unit_test(test_auth_bodies),
        cmocka_unit_test(test_bind_bodies),
        cmocka_unit_test(test_multipart_prefix_errors),
        cmocka_unit_test(test_builders_small_cap),
        cmocka_unit_test(test_builders_args),
        cmocka_unit_test(test_edgemux_answers),
        cmocka_unit_test(test_trailing_bytes),
        cmocka_unit_test(test_tunnel_start_vector),
        cmocka_unit_test(test_tunnel_control_vectors),
        cmocka_unit_test(test_tunnel_with_tid),
        cmocka_unit_test(test_tunnel_not_a_service),
        cmocka_unit_test(test_tunnel_fields),
        cmocka_unit_test(test_tunnel_target_scanner),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
