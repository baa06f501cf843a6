/* Fuzz target for the AlwaysOn codec: the header parser, then the body parser
 * the code calls for, and every other parser over the same bytes. Views the
 * parsers hand back are read in full, so a view that strays outside the input
 * is caught by the sanitizers; broken invariants abort. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile unsigned sink;

/* The view must lie inside [base, base+len); touch each byte. */
static void touch(const uint8_t *base, size_t len, const uint8_t *p, size_t n)
{
    if (n == 0)
        return;
    if (p < base || (size_t)(p - base) > len || n > len - (size_t)(p - base))
        abort();
    unsigned s = 0;
    for (size_t i = 0; i < n; i++)
        s += p[i];
    sink += s;
}

struct span {
    const uint8_t *base;
    size_t len;
    int calls;
};

static int on_field(void *user, struct emx_ao_str name, struct emx_ao_str desc, uint8_t bt,
                    uint16_t aspects)
{
    struct span *sp = user;
    touch(sp->base, sp->len, name.ptr, name.len);
    touch(sp->base, sp->len, desc.ptr, desc.len);
    sink += bt + aspects;
    /* Stop now and then, so the early-exit path is exercised too. */
    return ++sp->calls == 1000 ? 1 : 0;
}

static int on_row(void *user, uint16_t n)
{
    struct span *sp = user;
    sink += n;
    return ++sp->calls == 1000 ? 1 : 0;
}

static int on_value(void *user, uint8_t bt, const uint8_t *p, size_t n)
{
    struct span *sp = user;
    touch(sp->base, sp->len, p, n);
    sink += bt;
    /* A nested table handed out as a value must itself walk cleanly. */
    if (bt == EMX_BT_INFOTABLE) {
        size_t used = 0;
        if (emx_ao_walk_infotable(p, n, NULL, &used) != EMX_AO_OK || used != n)
            abort();
    }
    return 0;
}

static void walk_all(const uint8_t *p, size_t n)
{
    struct span sp = {p, n, 0};
    struct emx_ao_infotable_visitor v = {on_field, on_row, on_value, &sp};
    size_t used = 0;
    int rc = emx_ao_walk_infotable(p, n, &v, &used);
    if (rc == EMX_AO_OK && used > n)
        abort();

    /* skip must agree with the walk (a callback stop aside). */
    struct emx_ao_reader r = {p, n, 0};
    int src = emx_ao_skip_infotable(&r, 0);
    if (r.pos > n)
        abort();
    if (rc == EMX_AO_OK && (src != EMX_AO_OK || r.pos != used))
        abort();
    if (rc < 0 && src == EMX_AO_OK)
        abort();

    /* Every base type over the bytes as a single value. */
    if (n > 0) {
        r = (struct emx_ao_reader){p + 1, n - 1, 0};
        if (emx_ao_skip_primitive(&r, p[0], 0) == EMX_AO_OK && r.pos > n - 1)
            abort();
    }
}

static void touch_str(const uint8_t *b, size_t n, struct emx_ao_str s)
{
    if (s.ptr)
        touch(b, n, s.ptr, s.len);
    else if (s.len)
        abort();
}

/* The tunnel parser: its views lie in the body; a body that parses as a
 * request parses as a tunnel service too (or is none), and one that does
 * not never yields a tunnel service with OK. */
static void tunnel(const uint8_t *b, size_t n)
{
    struct emx_ao_tunnel_msg m;
    int rc = emx_ao_tunnel_parse(b, n, &m);
    struct emx_ao_request rq;
    int rrc = emx_ao_request_parse(b, n, &rq);
    if (rc == EMX_AO_OK && m.service != EMX_AO_TUNNEL_NONE && rrc != EMX_AO_OK)
        abort();
    if (rrc == EMX_AO_OK && rc != EMX_AO_OK)
        abort();
    if (m.service == EMX_AO_TUNNEL_NONE && rc == EMX_AO_OK)
        return;
    touch_str(b, n, m.thing);
    touch_str(b, n, m.tid);
    touch_str(b, n, m.type);
    touch_str(b, n, m.connection);
    touch_str(b, n, m.command);
    touch_str(b, n, m.peer_name);
    sink += (unsigned)strlen(emx_ao_tunnel_service_name(m.service));
    struct emx_ao_str host;
    uint16_t port = 0;
    if (emx_ao_tunnel_target(m.connection, &host, &port) == EMX_AO_OK)
        touch_str(m.connection.ptr, m.connection.len, host);
    /* The scanner over the raw bytes, whatever they are. */
    struct emx_ao_str raw = {b, (uint32_t)(n < UINT32_MAX ? n : UINT32_MAX)};
    if (emx_ao_tunnel_target(raw, &host, &port) == EMX_AO_OK)
        touch_str(b, n, host);
}

static void body(uint8_t code, bool multipart, const uint8_t *b, size_t n)
{
    if (multipart) {
        uint8_t et;
        struct emx_ao_str en;
        size_t off = 0;
        if (emx_ao_multipart_prefix_parse(b, n, &et, &en, &off) == EMX_AO_OK) {
            touch(b, n, en.ptr, en.len);
            if (off > n)
                abort();
        }
        return;
    }
    if (emx_ao_is_response(code)) {
        struct emx_ao_response r;
        if (emx_ao_response_parse(b, n, &r) == EMX_AO_OK) {
            if (r.has_reason)
                touch(b, n, r.reason.ptr, r.reason.len);
            if (r.has_content) {
                touch(b, n, r.content, r.content_len);
                walk_all(r.content, r.content_len);
            }
        }
        return;
    }
    switch (code) {
    case EMX_AO_AUTH: {
        uint8_t count;
        struct emx_ao_str key;
        int rc = emx_ao_auth_parse(b, n, &count);
        int frc = emx_ao_auth_find_claim(b, n, "appKey", &key);
        if ((rc == EMX_AO_OK) != (frc == EMX_AO_OK || frc == EMX_AO_EBODY))
            abort();
        if (frc == EMX_AO_OK)
            touch(b, n, key.ptr, key.len);
        break;
    }
    case EMX_AO_BIND:
    case EMX_AO_UNBIND: {
        struct emx_ao_bind bd;
        if (emx_ao_bind_parse(b, n, &bd) != EMX_AO_OK)
            break;
        if (bd.has_gateway) {
            touch(b, n, bd.gateway_name.ptr, bd.gateway_name.len);
            touch(b, n, bd.gateway_type.ptr, bd.gateway_type.len);
        }
        size_t cur = 0;
        struct emx_ao_str s;
        unsigned names = 0;
        int rc;
        while ((rc = emx_ao_bind_next_name(&bd, &cur, &s)) == EMX_AO_OK) {
            touch(b, n, s.ptr, s.len);
            names++;
        }
        if (rc != 1 || names != bd.count)
            abort();
        break;
    }
    default: {
        tunnel(b, n);
        struct emx_ao_request rq;
        if (emx_ao_request_parse(b, n, &rq) != EMX_AO_OK)
            break;
        touch(b, n, rq.entity_name.ptr, rq.entity_name.len);
        touch(b, n, rq.name.ptr, rq.name.len);
        touch(b, n, rq.headers, rq.headers_len);
        if (rq.has_params) {
            touch(b, n, rq.params, rq.params_len);
            walk_all(rq.params, rq.params_len);
        }
        break;
    }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct emx_ao_header h;
    size_t off = 0;
    if (emx_ao_header_parse(data, size, &h, &off) == EMX_AO_OK) {
        if (off > size)
            abort();
        /* A parsed header writes back to the same bytes. */
        uint8_t hdr[EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE];
        if (emx_ao_header_write(hdr, sizeof(hdr), &h) != off || memcmp(hdr, data, off) != 0)
            abort();
        body(h.code, h.multipart, data + off, size - off);
        sink += (unsigned)strlen(emx_ao_code_name(h.code));
    }

    /* Every parser over the raw bytes too, whatever the header says. */
    walk_all(data, size);
    body(EMX_AO_GET, false, data, size);
    body(EMX_AO_SUCCESS, false, data, size);
    body(EMX_AO_AUTH, false, data, size);
    body(EMX_AO_BIND, false, data, size);
    body(EMX_AO_GET, true, data, size);

    /* The builders echo what was parsed. */
    if (size >= 1) {
        uint8_t out[512];
        size_t klen = size - 1 < 200 ? size - 1 : 200;
        size_t n = emx_ao_build_auth(out, data[0], 1, 2, (const char *)data + 1, klen);
        if (n) {
            struct emx_ao_str key;
            if (emx_ao_auth_find_claim(out + EMX_AO_HEADER_SIZE, n - EMX_AO_HEADER_SIZE, "appKey",
                                       &key) != EMX_AO_OK ||
                key.len != klen || memcmp(key.ptr, data + 1, klen) != 0)
                abort();
        }
    }
    return 0;
}
