#include "ao.h"

#include <stdlib.h>
#include <string.h>

size_t ao_infotable_blob_size(const char *field, size_t len)
{
    /* shape: 01 name desc type aspects(2) 00; row: 01 count(2) type len(4) data; 00 */
    return 1 + emx_ao_str_size(strlen(field)) + 1 + 1 + 2 + 1 + 1 + 2 + 1 + 4 + len + 1;
}

size_t ao_infotable_blob(uint8_t *buf, size_t cap, const char *field, const uint8_t *data,
                         size_t len)
{
    size_t need = ao_infotable_blob_size(field, len);
    if (cap < need || len > 0x7FFFFFFF)
        return 0;
    size_t p = 0;
    buf[p++] = 1;
    p += emx_ao_write_str(buf + p, cap - p, field, strlen(field));
    buf[p++] = 0; /* empty description */
    buf[p++] = EMX_BT_BLOB;
    emx_ao_put_u16(buf + p, 0);
    p += 2;
    buf[p++] = 0; /* end of shape */
    buf[p++] = 1; /* one row */
    emx_ao_put_u16(buf + p, 1);
    p += 2;
    buf[p++] = EMX_BT_BLOB;
    emx_ao_put_u32(buf + p, (uint32_t)len);
    p += 4;
    if (len)
        memcpy(buf + p, data, len);
    p += len;
    buf[p++] = 0; /* end of rows */
    return p;
}

size_t ao_infotable_row_size(const struct ao_field *f, size_t n)
{
    size_t need = 1 + 3 + 1; /* end of shape; row marker + count; end of rows */
    for (size_t k = 0; k < n; k++) {
        need += 1 + emx_ao_str_size(strlen(f[k].name)) + 1 + 1 + 2 + 1;
        need += f[k].type == EMX_BT_STRING ? emx_ao_str_size(f[k].s ? strlen(f[k].s) : 0) : 4;
    }
    return need;
}

size_t ao_infotable_row(uint8_t *buf, size_t cap, const struct ao_field *f, size_t n)
{
    if (n > 0xFFFF || cap < ao_infotable_row_size(f, n))
        return 0;
    size_t p = 0;
    for (size_t k = 0; k < n; k++) {
        if (f[k].type != EMX_BT_STRING && f[k].type != EMX_BT_INTEGER)
            return 0;
        buf[p++] = 1;
        p += emx_ao_write_str(buf + p, cap - p, f[k].name, strlen(f[k].name));
        buf[p++] = 0; /* empty description */
        buf[p++] = f[k].type;
        emx_ao_put_u16(buf + p, 0);
        p += 2;
    }
    buf[p++] = 0; /* end of shape */
    buf[p++] = 1; /* one row */
    emx_ao_put_u16(buf + p, (uint16_t)n);
    p += 2;
    for (size_t k = 0; k < n; k++) {
        buf[p++] = f[k].type;
        if (f[k].type == EMX_BT_STRING) {
            const char *s = f[k].s ? f[k].s : "";
            p += emx_ao_write_str(buf + p, cap - p, s, strlen(s));
        } else {
            emx_ao_put_u32(buf + p, (uint32_t)f[k].i);
            p += 4;
        }
    }
    buf[p++] = 0; /* end of rows */
    return p;
}

int ao_emit(const struct emx_ao_header *h, uint8_t entity_type, const char *entity_name,
            const uint8_t *body, size_t body_len, size_t chunk_size, ao_send_fn send, void *arg)
{
    struct emx_ao_header hh = *h;
    hh.multipart = false;
    size_t total = EMX_AO_HEADER_SIZE + body_len;
    bool request = !emx_ao_is_response(h->code);
    if (total <= chunk_size || chunk_size == 0) {
        uint8_t *m = malloc(total);
        if (!m)
            return -1;
        emx_ao_header_write(m, total, &hh);
        memcpy(m + EMX_AO_HEADER_SIZE, body, body_len);
        int rc = send(arg, m, total);
        free(m);
        return rc;
    }
    /* A request's payload is its body after the prefix; a response's is
     * all of it. */
    size_t name_len = strlen(entity_name);
    const uint8_t *payload = body;
    size_t plen = body_len;
    if (request) {
        uint8_t et;
        struct emx_ao_str en;
        size_t off;
        if (emx_ao_multipart_prefix_parse(body, body_len, &et, &en, &off) != EMX_AO_OK)
            return -1;
        entity_type = et;
        name_len = en.len;
        entity_name = (const char *)en.ptr;
        payload = body + off;
        plen = body_len - off;
    }
    size_t overhead = EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE + 1 + emx_ao_str_size(name_len);
    if (chunk_size <= overhead || chunk_size > 0xFFFF)
        return -1;
    size_t per = chunk_size - overhead;
    size_t count = (plen + per - 1) / per;
    if (count == 0)
        count = 1;
    if (count > 0xFFFF)
        return -1;
    uint8_t *m = malloc(chunk_size);
    if (!m)
        return -1;
    hh.multipart = true;
    hh.chunk_count = (uint16_t)count;
    hh.chunk_size = (uint16_t)chunk_size;
    int rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++) {
        hh.chunk_id = (uint16_t)(i + 1);
        size_t p = emx_ao_header_write(m, chunk_size, &hh);
        m[p++] = entity_type;
        p += emx_ao_write_str(m + p, chunk_size - p, entity_name, name_len);
        size_t n = plen - i * per < per ? plen - i * per : per;
        memcpy(m + p, payload + i * per, n);
        rc = send(arg, m, p + n);
    }
    free(m);
    return rc;
}

struct partial {
    struct emx_ao_header first;
    uint16_t next; /* chunk id expected next */
    uint8_t entity_type;
    uint8_t *name; /* entity name of chunk 1 */
    size_t name_len;
    uint8_t *data;
    size_t len, cap;
};

void ao_reasm_init(struct ao_reasm *r, size_t max_total)
{
    hmap_init(&r->map);
    r->max_total = max_total;
}

static void free_partial(void *arg, const char *k, size_t kl, void *v)
{
    (void)arg, (void)k, (void)kl;
    struct partial *p = v;
    free(p->name);
    free(p->data);
    free(p);
}

void ao_reasm_free(struct ao_reasm *r)
{
    hmap_each(&r->map, free_partial, NULL);
    hmap_free(&r->map);
}

size_t ao_reasm_pending(const struct ao_reasm *r)
{
    return r->map.count;
}

int ao_reasm_feed(struct ao_reasm *r, const struct emx_ao_header *h, const uint8_t *msg, size_t len,
                  size_t body_off, uint8_t **out, size_t *out_len)
{
    uint8_t key[9];
    emx_ao_put_u32(key, h->endpoint_id);
    emx_ao_put_u32(key + 4, h->request_id);
    key[8] = emx_ao_is_response(h->code);
    uint8_t et;
    struct emx_ao_str en;
    size_t off;
    int rc = emx_ao_multipart_prefix_parse(msg + body_off, len - body_off, &et, &en, &off);
    struct partial *p = hmap_get(&r->map, key, sizeof(key));
    if (rc != EMX_AO_OK) {
        if (p)
            free_partial(NULL, NULL, 0, hmap_del(&r->map, key, sizeof(key)));
        return rc;
    }
    const uint8_t *payload = msg + body_off + off;
    size_t plen = len - body_off - off;
    if (!p) {
        if (h->chunk_id != 1)
            return AO_REASM_ESEQ;
        p = calloc(1, sizeof(*p));
        if (!p || !(p->name = malloc(en.len + 1))) {
            free(p);
            return AO_REASM_ETOOBIG;
        }
        p->first = *h;
        p->next = 1;
        p->entity_type = et;
        memcpy(p->name, en.ptr, en.len);
        p->name_len = en.len;
        if (hmap_put(&r->map, key, sizeof(key), p, NULL) != 0) {
            free_partial(NULL, NULL, 0, p);
            return AO_REASM_ETOOBIG;
        }
    }
    int err = 0;
    if (h->chunk_id != p->next || h->chunk_count != p->first.chunk_count ||
        h->code != p->first.code || et != p->entity_type || en.len != p->name_len ||
        memcmp(en.ptr, p->name, en.len) != 0)
        err = AO_REASM_ESEQ;
    else if (p->len + plen + p->name_len + 6 > r->max_total)
        err = AO_REASM_ETOOBIG;
    if (!err && p->cap - p->len < plen) {
        size_t cap = p->cap ? p->cap : 16384;
        while (cap - p->len < plen)
            cap *= 2;
        uint8_t *d = realloc(p->data, cap);
        if (!d)
            err = AO_REASM_ETOOBIG;
        else {
            p->data = d;
            p->cap = cap;
        }
    }
    if (err) {
        free_partial(NULL, NULL, 0, hmap_del(&r->map, key, sizeof(key)));
        return err;
    }
    if (plen)
        memcpy(p->data + p->len, payload, plen);
    p->len += plen;
    p->next++;
    if (h->chunk_id < h->chunk_count)
        return AO_REASM_MORE;
    hmap_del(&r->map, key, sizeof(key));
    bool request = !emx_ao_is_response(h->code);
    size_t prefix = request ? 1 + emx_ao_str_size(p->name_len) : 0;
    size_t total = EMX_AO_HEADER_SIZE + prefix + p->len;
    uint8_t *m = malloc(total);
    if (!m) {
        free_partial(NULL, NULL, 0, p);
        return AO_REASM_ETOOBIG;
    }
    struct emx_ao_header hh = p->first;
    hh.multipart = false;
    size_t q = emx_ao_header_write(m, total, &hh);
    if (request) {
        m[q++] = p->entity_type;
        q += emx_ao_write_str(m + q, total - q, p->name, p->name_len);
    }
    if (p->len)
        memcpy(m + q, p->data, p->len);
    free_partial(NULL, NULL, 0, p);
    *out = m;
    *out_len = total;
    return AO_REASM_DONE;
}
