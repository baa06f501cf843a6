/* The AlwaysOn codec. Every parser works on a bounded cursor and checks the
 * remaining length before each load, so no input can make it read past `len`;
 * nothing here allocates. */
#include "codec.h"

#include <string.h>

/* ---- codes ---- */

static const char *const code_names[256] = {
    [EMX_AO_GET] = "GET",
    [EMX_AO_PUT] = "PUT",
    [EMX_AO_POST] = "POST",
    [EMX_AO_DELETE] = "DELETE",
    [EMX_AO_BIND] = "BIND",
    [EMX_AO_UNBIND] = "UNBIND",
    [EMX_AO_AUTH] = "AUTH",
    [EMX_AO_KEEP_ALIVE] = "KEEP_ALIVE",
    [EMX_AO_SUCCESS] = "SUCCESS",
    [EMX_AO_BAD_REQUEST] = "BAD_REQUEST",
    [EMX_AO_UNAUTHORIZED] = "UNAUTHORIZED",
    [EMX_AO_FORBIDDEN] = "FORBIDDEN",
    [EMX_AO_NOT_FOUND] = "NOT_FOUND",
    [EMX_AO_ENTITY_TOO_LARGE] = "ENTITY_TOO_LARGE",
    [EMX_AO_INTERNAL_ERROR] = "INTERNAL_SERVER_ERROR",
    [EMX_AO_NOT_IMPLEMENTED] = "NOT_IMPLEMENTED",
    [EMX_AO_BAD_GATEWAY] = "BAD_GATEWAY",
    [EMX_AO_SERVICE_UNAVAILABLE] = "SERVICE_UNAVAILABLE",
    [EMX_AO_GATEWAY_TIMEOUT] = "GATEWAY_TIMEOUT",
};

bool emx_ao_is_known_request(uint8_t code)
{
    /* KEEP_ALIVE counts: edgemux answers it itself instead of refusing it. */
    return !emx_ao_is_response(code) && code_names[code] != NULL;
}

bool emx_ao_is_known_code(uint8_t code)
{
    return code_names[code] != NULL;
}

const char *emx_ao_code_name(uint8_t code)
{
    const char *n = code_names[code];
    return n ? n : "UNKNOWN";
}

const char *emx_ao_strerror(int err)
{
    switch (err) {
    case EMX_AO_OK:
        return "ok";
    case EMX_AO_ETRUNC:
        return "truncated";
    case EMX_AO_EVERSION:
        return "unsupported version";
    case EMX_AO_EMULTIPART:
        return "bad multipart header";
    case EMX_AO_EBODY:
        return "malformed body";
    case EMX_AO_ETYPE:
        return "unknown base type";
    case EMX_AO_EDEPTH:
        return "InfoTable nested too deep";
    case EMX_AO_ETRAIL:
        return "trailing bytes after body";
    default:
        return "unknown codec error";
    }
}

/* ---- header ---- */

int emx_ao_header_parse(const uint8_t *buf, size_t len, struct emx_ao_header *h, size_t *body_off)
{
    if (len < EMX_AO_HEADER_SIZE)
        return EMX_AO_ETRUNC;
    if (buf[EMX_AO_OFF_VERSION] != EMX_AO_VERSION)
        return EMX_AO_EVERSION;
    uint8_t mp = buf[EMX_AO_OFF_MULTIPART];
    if (mp > 1)
        return EMX_AO_EMULTIPART;
    h->version = EMX_AO_VERSION;
    h->code = buf[EMX_AO_OFF_CODE];
    h->request_id = emx_ao_get_u32(buf + EMX_AO_OFF_REQUEST_ID);
    h->endpoint_id = emx_ao_get_u32(buf + EMX_AO_OFF_ENDPOINT_ID);
    h->session_id = emx_ao_get_u32(buf + EMX_AO_OFF_SESSION_ID);
    h->multipart = mp;
    if (!mp) {
        h->chunk_id = h->chunk_count = h->chunk_size = 0;
        if (body_off)
            *body_off = EMX_AO_HEADER_SIZE;
        return EMX_AO_OK;
    }
    if (len < EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE)
        return EMX_AO_ETRUNC;
    const uint8_t *m = buf + EMX_AO_HEADER_SIZE;
    h->chunk_id = emx_ao_get_u16(m);
    h->chunk_count = emx_ao_get_u16(m + 2);
    h->chunk_size = emx_ao_get_u16(m + 4);
    if (h->chunk_id == 0 || h->chunk_count == 0 || h->chunk_id > h->chunk_count)
        return EMX_AO_EMULTIPART;
    if (body_off)
        *body_off = EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE;
    return EMX_AO_OK;
}

size_t emx_ao_header_write(uint8_t *buf, size_t cap, const struct emx_ao_header *h)
{
    size_t need = EMX_AO_HEADER_SIZE + (h->multipart ? EMX_AO_MULTIPART_SIZE : 0);
    if (cap < need)
        return 0;
    /* Refuse what the parser would refuse, so every written header reads back. */
    if (h->multipart && (h->chunk_id == 0 || h->chunk_count == 0 || h->chunk_id > h->chunk_count))
        return 0;
    /* There is only one version; h->version is not trusted to be set. */
    buf[EMX_AO_OFF_VERSION] = EMX_AO_VERSION;
    buf[EMX_AO_OFF_CODE] = h->code;
    emx_ao_put_u32(buf + EMX_AO_OFF_REQUEST_ID, h->request_id);
    emx_ao_put_u32(buf + EMX_AO_OFF_ENDPOINT_ID, h->endpoint_id);
    emx_ao_put_u32(buf + EMX_AO_OFF_SESSION_ID, h->session_id);
    buf[EMX_AO_OFF_MULTIPART] = h->multipart ? 1 : 0;
    if (h->multipart) {
        uint8_t *m = buf + EMX_AO_HEADER_SIZE;
        emx_ao_put_u16(m, h->chunk_id);
        emx_ao_put_u16(m + 2, h->chunk_count);
        emx_ao_put_u16(m + 4, h->chunk_size);
    }
    return need;
}

/* ---- strings and primitives ---- */

/* Bytes left; a cursor whose pos ran past len (a caller's bug) has none. */
static inline size_t avail(const struct emx_ao_reader *r)
{
    return r->pos <= r->len ? r->len - r->pos : 0;
}

static inline int skip_bytes(struct emx_ao_reader *r, size_t n)
{
    if (avail(r) < n)
        return EMX_AO_ETRUNC;
    r->pos += n;
    return EMX_AO_OK;
}

int emx_ao_read_u8(struct emx_ao_reader *r, uint8_t *out)
{
    if (avail(r) < 1)
        return EMX_AO_ETRUNC;
    *out = r->buf[r->pos++];
    return EMX_AO_OK;
}

int emx_ao_read_u16(struct emx_ao_reader *r, uint16_t *out)
{
    if (avail(r) < 2)
        return EMX_AO_ETRUNC;
    *out = emx_ao_get_u16(r->buf + r->pos);
    r->pos += 2;
    return EMX_AO_OK;
}

int emx_ao_read_u32(struct emx_ao_reader *r, uint32_t *out)
{
    if (avail(r) < 4)
        return EMX_AO_ETRUNC;
    *out = emx_ao_get_u32(r->buf + r->pos);
    r->pos += 4;
    return EMX_AO_OK;
}

int emx_ao_read_str(struct emx_ao_reader *r, struct emx_ao_str *out)
{
    size_t left = avail(r);
    if (left < 1)
        return EMX_AO_ETRUNC;
    const uint8_t *p = r->buf + r->pos;
    uint32_t n;
    size_t hdr;
    if (p[0] < 0x80) {
        n = p[0];
        hdr = 1;
    } else {
        if (left < 4)
            return EMX_AO_ETRUNC;
        n = emx_ao_get_u32(p) & 0x7FFFFFFFu;
        hdr = 4;
    }
    /* Compare without adding, so a huge n cannot wrap. */
    if (left - hdr < n)
        return EMX_AO_ETRUNC;
    out->ptr = p + hdr;
    out->len = n;
    r->pos += hdr + n;
    return EMX_AO_OK;
}

size_t emx_ao_str_size(size_t len)
{
    return (len < 0x80 ? 1 : 4) + len;
}

size_t emx_ao_write_str(uint8_t *buf, size_t cap, const void *s, size_t len)
{
    if (len > 0x7FFFFFFFu || (len > 0 && s == NULL))
        return 0;
    size_t need = emx_ao_str_size(len);
    if (cap < need)
        return 0;
    size_t hdr;
    if (len < 0x80) {
        buf[0] = (uint8_t)len;
        hdr = 1;
    } else {
        emx_ao_put_u32(buf, (uint32_t)len | 0x80000000u);
        hdr = 4;
    }
    if (len)
        memcpy(buf + hdr, s, len);
    return need;
}

bool emx_ao_str_eq(struct emx_ao_str s, const char *cstr)
{
    if (!cstr)
        return false;
    size_t n = strlen(cstr);
    return n == s.len && (n == 0 || memcmp(s.ptr, cstr, n) == 0);
}

static bool is_string_type(uint8_t t)
{
    switch (t) {
    case EMX_BT_STRING:
    case EMX_BT_XML:
    case EMX_BT_JSON:
    case EMX_BT_QUERY:
    case EMX_BT_HYPERLINK:
    case EMX_BT_IMAGELINK:
    case EMX_BT_PASSWORD:
    case EMX_BT_HTML:
    case EMX_BT_TEXT:
    case EMX_BT_TAGS:
    case EMX_BT_SCHEDULE:
    case EMX_BT_GUID:
    case EMX_BT_PROPERTYNAME:
    case EMX_BT_SERVICENAME:
    case EMX_BT_EVENTNAME:
        return true;
    default:
        return t >= EMX_BT_THINGNAME && t <= EMX_BT_ENTITYNAME_LAST;
    }
}

/* Depth counts the containers (InfoTables and VARIANTs) around a value: a
 * top-level InfoTable is at depth 0 and the values of its rows at depth 1.
 * An InfoTable or VARIANT at depth EMX_AO_INFOTABLE_MAX_DEPTH or more is
 * refused, which also bounds the recursion. */
int emx_ao_skip_primitive(struct emx_ao_reader *r, uint8_t base_type, unsigned depth)
{
    struct emx_ao_str s;
    uint32_t n;
    int rc;
    switch (base_type) {
    case EMX_BT_NOTHING:
        return EMX_AO_OK;
    case EMX_BT_BOOLEAN:
        return skip_bytes(r, 1);
    case EMX_BT_INTEGER:
        return skip_bytes(r, 4);
    case EMX_BT_NUMBER:
    case EMX_BT_DATETIME:
    case EMX_BT_TIMESPAN:
        return skip_bytes(r, 8);
    case EMX_BT_LOCATION:
        return skip_bytes(r, 24);
    case EMX_BT_BLOB:
    case EMX_BT_IMAGE:
        if ((rc = emx_ao_read_u32(r, &n)) != EMX_AO_OK)
            return rc;
        return skip_bytes(r, n);
    case EMX_BT_INFOTABLE:
        return emx_ao_skip_infotable(r, depth);
    case EMX_BT_VARIANT: {
        if (depth >= EMX_AO_INFOTABLE_MAX_DEPTH)
            return EMX_AO_EDEPTH;
        uint8_t inner;
        if ((rc = emx_ao_read_u8(r, &inner)) != EMX_AO_OK)
            return rc;
        return emx_ao_skip_primitive(r, inner, depth + 1);
    }
    default:
        if (is_string_type(base_type))
            return emx_ao_read_str(r, &s);
        return EMX_AO_ETYPE;
    }
}

static bool is_known_type(uint8_t t)
{
    switch (t) {
    case EMX_BT_NOTHING:
    case EMX_BT_NUMBER:
    case EMX_BT_BOOLEAN:
    case EMX_BT_DATETIME:
    case EMX_BT_TIMESPAN:
    case EMX_BT_INFOTABLE:
    case EMX_BT_LOCATION:
    case EMX_BT_IMAGE:
    case EMX_BT_VARIANT:
    case EMX_BT_BLOB:
    case EMX_BT_INTEGER:
        return true;
    default:
        return is_string_type(t);
    }
}

/* One walk serves both skip (v NULL) and the visitor. A callback's non-zero
 * return is passed through unchanged. */
static int walk(struct emx_ao_reader *r, unsigned depth, const struct emx_ao_infotable_visitor *v)
{
    if (depth >= EMX_AO_INFOTABLE_MAX_DEPTH)
        return EMX_AO_EDEPTH;
    int rc;
    uint8_t marker;
    /* The shape: field definitions until 0x00. */
    for (;;) {
        if ((rc = emx_ao_read_u8(r, &marker)) != EMX_AO_OK)
            return rc;
        if (marker == 0x00)
            break;
        if (marker != 0x01)
            return EMX_AO_EBODY;
        struct emx_ao_str name, desc;
        uint8_t bt;
        uint16_t aspects;
        if ((rc = emx_ao_read_str(r, &name)) != EMX_AO_OK ||
            (rc = emx_ao_read_str(r, &desc)) != EMX_AO_OK ||
            (rc = emx_ao_read_u8(r, &bt)) != EMX_AO_OK ||
            (rc = emx_ao_read_u16(r, &aspects)) != EMX_AO_OK)
            return rc;
        if (!is_known_type(bt))
            return EMX_AO_ETYPE;
        for (unsigned i = 0; i < aspects; i++) {
            struct emx_ao_str aname;
            uint8_t at;
            if ((rc = emx_ao_read_str(r, &aname)) != EMX_AO_OK ||
                (rc = emx_ao_read_u8(r, &at)) != EMX_AO_OK ||
                (rc = emx_ao_skip_primitive(r, at, depth + 1)) != EMX_AO_OK)
                return rc;
        }
        if (v && v->field && (rc = v->field(v->user, name, desc, bt, aspects)) != 0)
            return rc;
    }
    /* The rows: each a count of typed values, until 0x00. */
    for (;;) {
        if ((rc = emx_ao_read_u8(r, &marker)) != EMX_AO_OK)
            return rc;
        if (marker == 0x00)
            return EMX_AO_OK;
        if (marker != 0x01)
            return EMX_AO_EBODY;
        uint16_t fields;
        if ((rc = emx_ao_read_u16(r, &fields)) != EMX_AO_OK)
            return rc;
        if (v && v->row_begin && (rc = v->row_begin(v->user, fields)) != 0)
            return rc;
        for (unsigned i = 0; i < fields; i++) {
            uint8_t t;
            if ((rc = emx_ao_read_u8(r, &t)) != EMX_AO_OK)
                return rc;
            size_t start = r->pos;
            if ((rc = emx_ao_skip_primitive(r, t, depth + 1)) != EMX_AO_OK)
                return rc;
            if (v && v->value && (rc = v->value(v->user, t, r->buf + start, r->pos - start)) != 0)
                return rc;
        }
    }
}

int emx_ao_skip_infotable(struct emx_ao_reader *r, unsigned depth)
{
    return walk(r, depth, NULL);
}

int emx_ao_walk_infotable(const uint8_t *buf, size_t len, const struct emx_ao_infotable_visitor *v,
                          size_t *consumed)
{
    struct emx_ao_reader r = {buf, len, 0};
    int rc = walk(&r, 0, v);
    if (rc == EMX_AO_OK && consumed)
        *consumed = r.pos;
    return rc;
}

/* ---- bodies ---- */

/* Content of a request or response: 0x05 + InfoTable, or 0xFF. */
static int read_content(struct emx_ao_reader *r, bool *has, const uint8_t **ptr, size_t *len)
{
    uint8_t marker;
    int rc = emx_ao_read_u8(r, &marker);
    if (rc != EMX_AO_OK)
        return rc;
    if (marker == EMX_BT_NOTHING) {
        *has = false;
        *ptr = NULL;
        *len = 0;
        return EMX_AO_OK;
    }
    if (marker != EMX_BT_INFOTABLE)
        return EMX_AO_EBODY;
    size_t start = r->pos;
    if ((rc = emx_ao_skip_infotable(r, 0)) != EMX_AO_OK)
        return rc;
    *has = true;
    *ptr = r->buf + start;
    *len = r->pos - start;
    return EMX_AO_OK;
}

static int skip_str_pairs(struct emx_ao_reader *r, unsigned count)
{
    struct emx_ao_str s;
    int rc;
    for (unsigned i = 0; i < count; i++) {
        if ((rc = emx_ao_read_str(r, &s)) != EMX_AO_OK ||
            (rc = emx_ao_read_str(r, &s)) != EMX_AO_OK)
            return rc;
    }
    return EMX_AO_OK;
}

static int end_of_body(const struct emx_ao_reader *r)
{
    return avail(r) ? EMX_AO_ETRAIL : EMX_AO_OK;
}

int emx_ao_request_parse(const uint8_t *body, size_t len, struct emx_ao_request *out)
{
    struct emx_ao_reader r = {body, len, 0};
    int rc;
    if ((rc = emx_ao_read_u8(&r, &out->entity_type)) != EMX_AO_OK ||
        (rc = emx_ao_read_str(&r, &out->entity_name)) != EMX_AO_OK ||
        (rc = emx_ao_read_u8(&r, &out->characteristic)) != EMX_AO_OK ||
        (rc = emx_ao_read_str(&r, &out->name)) != EMX_AO_OK ||
        (rc = emx_ao_read_u8(&r, &out->header_count)) != EMX_AO_OK)
        return rc;
    size_t hstart = r.pos;
    if ((rc = skip_str_pairs(&r, out->header_count)) != EMX_AO_OK)
        return rc;
    out->headers = body + hstart;
    out->headers_len = r.pos - hstart;
    if ((rc = read_content(&r, &out->has_params, &out->params, &out->params_len)) != EMX_AO_OK)
        return rc;
    return end_of_body(&r);
}

int emx_ao_response_parse(const uint8_t *body, size_t len, struct emx_ao_response *out)
{
    struct emx_ao_reader r = {body, len, 0};
    uint8_t marker;
    int rc = emx_ao_read_u8(&r, &marker);
    if (rc != EMX_AO_OK)
        return rc;
    if (marker > 1)
        return EMX_AO_EBODY;
    out->has_reason = marker == 1;
    out->reason.ptr = NULL;
    out->reason.len = 0;
    if (out->has_reason && (rc = emx_ao_read_str(&r, &out->reason)) != EMX_AO_OK)
        return rc;
    if ((rc = read_content(&r, &out->has_content, &out->content, &out->content_len)) != EMX_AO_OK)
        return rc;
    return end_of_body(&r);
}

int emx_ao_multipart_prefix_parse(const uint8_t *body, size_t len, uint8_t *entity_type,
                                  struct emx_ao_str *entity_name, size_t *payload_off)
{
    struct emx_ao_reader r = {body, len, 0};
    int rc;
    if ((rc = emx_ao_read_u8(&r, entity_type)) != EMX_AO_OK ||
        (rc = emx_ao_read_str(&r, entity_name)) != EMX_AO_OK)
        return rc;
    if (payload_off)
        *payload_off = r.pos;
    return EMX_AO_OK;
}

int emx_ao_auth_parse(const uint8_t *body, size_t len, uint8_t *claim_count)
{
    struct emx_ao_reader r = {body, len, 0};
    uint8_t n;
    int rc;
    if ((rc = emx_ao_read_u8(&r, &n)) != EMX_AO_OK || (rc = skip_str_pairs(&r, n)) != EMX_AO_OK)
        return rc;
    if ((rc = end_of_body(&r)) != EMX_AO_OK)
        return rc;
    if (claim_count)
        *claim_count = n;
    return EMX_AO_OK;
}

int emx_ao_auth_find_claim(const uint8_t *body, size_t len, const char *name,
                           struct emx_ao_str *value)
{
    /* Validate the whole body first: a malformed body is not "claim absent". */
    uint8_t n;
    int rc = emx_ao_auth_parse(body, len, &n);
    if (rc != EMX_AO_OK)
        return rc;
    struct emx_ao_reader r = {body, len, 1};
    for (unsigned i = 0; i < n; i++) {
        struct emx_ao_str k, val;
        if ((rc = emx_ao_read_str(&r, &k)) != EMX_AO_OK ||
            (rc = emx_ao_read_str(&r, &val)) != EMX_AO_OK)
            return rc;
        if (emx_ao_str_eq(k, name)) {
            if (value)
                *value = val;
            return EMX_AO_OK;
        }
    }
    return EMX_AO_EBODY;
}

int emx_ao_bind_parse(const uint8_t *body, size_t len, struct emx_ao_bind *out)
{
    struct emx_ao_reader r = {body, len, 0};
    uint8_t gw;
    int rc = emx_ao_read_u8(&r, &gw);
    if (rc != EMX_AO_OK)
        return rc;
    if (gw > 1)
        return EMX_AO_EBODY;
    out->has_gateway = gw == 1;
    out->gateway_name.ptr = out->gateway_type.ptr = NULL;
    out->gateway_name.len = out->gateway_type.len = 0;
    if (out->has_gateway && ((rc = emx_ao_read_str(&r, &out->gateway_name)) != EMX_AO_OK ||
                             (rc = emx_ao_read_str(&r, &out->gateway_type)) != EMX_AO_OK))
        return rc;
    if ((rc = emx_ao_read_u16(&r, &out->count)) != EMX_AO_OK)
        return rc;
    size_t start = r.pos;
    struct emx_ao_str s;
    for (unsigned i = 0; i < out->count; i++)
        if ((rc = emx_ao_read_str(&r, &s)) != EMX_AO_OK)
            return rc;
    out->names = body + start;
    out->names_len = r.pos - start;
    return end_of_body(&r);
}

int emx_ao_bind_next_name(const struct emx_ao_bind *b, size_t *cursor, struct emx_ao_str *out)
{
    if (*cursor >= b->names_len)
        return 1;
    struct emx_ao_reader r = {b->names, b->names_len, *cursor};
    int rc = emx_ao_read_str(&r, out);
    if (rc != EMX_AO_OK)
        return rc;
    *cursor = r.pos;
    return EMX_AO_OK;
}

/* ---- Remote Access tunnel control services ---- */

enum tunnel_field {
    TF_TID = 0,
    TF_TYPE,
    TF_CONNECTION,
    TF_COMMAND,
    TF_PEER_NAME,
    TF_CHUNKSIZE,
    TF_IDLE_TIMEOUT,
    TF_READ_TIMEOUT,
    TF__COUNT
};

static const char *const tunnel_field_names[TF__COUNT] = {
    "tid",       "type",      "connection",   "command",
    "peer_name", "chunksize", "idle_timeout", "read_timeout",
};

static const char *const tunnel_service_names[] = {
    [EMX_AO_TUNNEL_NONE] = "",
    [EMX_AO_TUNNEL_START] = "StartTunnel",
    [EMX_AO_TUNNEL_COMPLETE] = "CompleteTunnel",
    [EMX_AO_TUNNEL_COMMAND_TO] = "TunnelCommandToEdge",
    [EMX_AO_TUNNEL_COMMAND_FROM] = "TunnelCommandFromEdge",
};

const char *emx_ao_tunnel_service_name(enum emx_ao_tunnel_service s)
{
    if ((unsigned)s >= sizeof(tunnel_service_names) / sizeof(tunnel_service_names[0]))
        return "";
    return tunnel_service_names[s];
}

struct tunnel_walk {
    struct emx_ao_tunnel_msg *out;
    size_t nfields;         /* shape fields seen so far */
    size_t slot[TF__COUNT]; /* shape index of each field we read; SIZE_MAX: none */
    uint32_t rows;          /* rows begun */
    size_t value_idx;       /* index of the next value in the current row */
};

static int tunnel_on_field(void *user, struct emx_ao_str name, struct emx_ao_str desc,
                           uint8_t base_type, uint16_t aspect_count)
{
    (void)desc;
    (void)base_type;
    (void)aspect_count;
    struct tunnel_walk *w = user;
    for (unsigned i = 0; i < TF__COUNT; i++)
        if (w->slot[i] == SIZE_MAX && emx_ao_str_eq(name, tunnel_field_names[i]))
            w->slot[i] = w->nfields;
    w->nfields++;
    return 0;
}

static int tunnel_on_row(void *user, uint16_t field_count)
{
    (void)field_count;
    struct tunnel_walk *w = user;
    if (w->rows < UINT32_MAX)
        w->rows++;
    w->value_idx = 0;
    return 0;
}

static int tunnel_on_value(void *user, uint8_t base_type, const uint8_t *value, size_t len)
{
    struct tunnel_walk *w = user;
    size_t idx = w->value_idx++;
    if (w->rows != 1) /* the SDK reads the first row only */
        return 0;
    struct emx_ao_tunnel_msg *m = w->out;
    for (unsigned i = 0; i < TF__COUNT; i++) {
        if (w->slot[i] != idx)
            continue;
        if (i <= TF_PEER_NAME) {
            struct emx_ao_reader r = {value, len, 0};
            struct emx_ao_str s;
            if (!is_string_type(base_type) || emx_ao_read_str(&r, &s) != EMX_AO_OK)
                continue;
            struct emx_ao_str *dst[] = {&m->tid, &m->type, &m->connection, &m->command,
                                        &m->peer_name};
            *dst[i] = s;
            if (i == TF_TID) {
                m->tid_value = value;
                m->tid_value_len = r.pos; /* the prefix and the bytes, nothing after */
            }
        } else {
            if (base_type != EMX_BT_INTEGER || len != 4)
                continue;
            int32_t v = (int32_t)emx_ao_get_u32(value);
            if (i == TF_CHUNKSIZE) {
                m->chunksize = v;
                m->has_chunksize = true;
            } else if (i == TF_IDLE_TIMEOUT) {
                m->idle_timeout = v;
                m->has_idle_timeout = true;
            } else {
                m->read_timeout = v;
                m->has_read_timeout = true;
            }
        }
    }
    return 0;
}

int emx_ao_tunnel_parse(const uint8_t *body, size_t len, struct emx_ao_tunnel_msg *out)
{
    memset(out, 0, sizeof(*out));
    /* The prefix first: most requests are not tunnel services, and for them
     * nothing past the service name is read. */
    struct emx_ao_reader r = {body, len, 0};
    uint8_t characteristic;
    struct emx_ao_str name;
    int rc;
    if ((rc = emx_ao_read_u8(&r, &out->entity_type)) != EMX_AO_OK ||
        (rc = emx_ao_read_str(&r, &out->thing)) != EMX_AO_OK ||
        (rc = emx_ao_read_u8(&r, &characteristic)) != EMX_AO_OK ||
        (rc = emx_ao_read_str(&r, &name)) != EMX_AO_OK)
        return rc;
    if (characteristic != EMX_AO_CHARACTERISTIC_SERVICES)
        return EMX_AO_OK;
    for (unsigned s = EMX_AO_TUNNEL_START; s <= EMX_AO_TUNNEL_COMMAND_FROM; s++)
        if (emx_ao_str_eq(name, tunnel_service_names[s]))
            out->service = (enum emx_ao_tunnel_service)s;
    if (out->service == EMX_AO_TUNNEL_NONE)
        return EMX_AO_OK;
    struct emx_ao_request req;
    if ((rc = emx_ao_request_parse(body, len, &req)) != EMX_AO_OK)
        return rc;
    if (!req.has_params)
        return EMX_AO_OK;
    struct tunnel_walk w = {.out = out};
    for (unsigned i = 0; i < TF__COUNT; i++)
        w.slot[i] = SIZE_MAX;
    struct emx_ao_infotable_visitor v = {tunnel_on_field, tunnel_on_row, tunnel_on_value, &w};
    return emx_ao_walk_infotable(req.params, req.params_len, &v, NULL);
}

size_t emx_ao_tunnel_with_tid(const uint8_t *msg, size_t len, const struct emx_ao_tunnel_msg *m,
                              const void *tid, size_t tid_len, uint8_t *out, size_t cap)
{
    if (!m->tid_value || m->tid_value < msg || m->tid_value_len > len ||
        (size_t)(m->tid_value - msg) > len - m->tid_value_len)
        return 0;
    size_t head = (size_t)(m->tid_value - msg), tail = len - head - m->tid_value_len;
    size_t enc = emx_ao_str_size(tid_len);
    if (tid_len > 0x7FFFFFFFu || cap < head || cap - head < enc || cap - head - enc < tail)
        return 0;
    memcpy(out, msg, head);
    if (emx_ao_write_str(out + head, enc, tid, tid_len) != enc)
        return 0;
    memcpy(out + head + enc, msg + head + m->tid_value_len, tail);
    return head + enc + tail;
}

/* A bounded scanner over JSON text: enough to find two top-level members. */
struct jscan {
    const uint8_t *p;
    size_t len, pos;
};

static void js_ws(struct jscan *j)
{
    while (j->pos < j->len && (j->p[j->pos] == ' ' || j->p[j->pos] == '\t' ||
                               j->p[j->pos] == '\n' || j->p[j->pos] == '\r'))
        j->pos++;
}

/* A string at pos (its opening quote); *s is its raw contents. */
static bool js_string(struct jscan *j, struct emx_ao_str *s)
{
    if (j->pos >= j->len || j->p[j->pos] != '"')
        return false;
    size_t start = ++j->pos;
    while (j->pos < j->len) {
        uint8_t c = j->p[j->pos];
        if (c == '\\') {
            j->pos += 2;
            continue;
        }
        if (c == '"') {
            s->ptr = j->p + start;
            s->len = (uint32_t)(j->pos - start);
            j->pos++;
            return true;
        }
        j->pos++;
    }
    return false;
}

/* Skip one value (any kind) up to the ',' or '}' that ends it. */
static bool js_skip_value(struct jscan *j)
{
    size_t depth = 0;
    struct emx_ao_str s;
    while (j->pos < j->len) {
        uint8_t c = j->p[j->pos];
        if (c == '"') {
            if (!js_string(j, &s))
                return false;
            continue;
        }
        if (depth == 0 && (c == ',' || c == '}'))
            return true;
        if (c == '{' || c == '[')
            depth++;
        else if (c == '}' || c == ']') {
            if (depth == 0)
                return false;
            depth--;
        }
        j->pos++;
    }
    return false;
}

int emx_ao_tunnel_target(struct emx_ao_str connection, struct emx_ao_str *host, uint16_t *port)
{
    struct jscan j = {connection.ptr, connection.ptr ? connection.len : 0, 0};
    bool have_host = false, have_port = false;
    js_ws(&j);
    if (j.pos >= j.len || j.p[j.pos] != '{')
        return EMX_AO_EBODY;
    j.pos++;
    for (;;) {
        js_ws(&j);
        struct emx_ao_str key;
        if (!js_string(&j, &key))
            break;
        js_ws(&j);
        if (j.pos >= j.len || j.p[j.pos] != ':')
            break;
        j.pos++;
        js_ws(&j);
        if (emx_ao_str_eq(key, "host") && !have_host && j.pos < j.len && j.p[j.pos] == '"') {
            if (!js_string(&j, host))
                break;
            have_host = true;
        } else if (emx_ao_str_eq(key, "port") && !have_port && j.pos < j.len && j.p[j.pos] >= '0' &&
                   j.p[j.pos] <= '9') {
            uint32_t v = 0;
            while (j.pos < j.len && j.p[j.pos] >= '0' && j.p[j.pos] <= '9') {
                if (v <= 65535)
                    v = v * 10 + (uint32_t)(j.p[j.pos] - '0');
                j.pos++;
            }
            if (v > 65535)
                break;
            *port = (uint16_t)v;
            have_port = true;
        }
        if (!js_skip_value(&j))
            break;
        if (j.p[j.pos] == '}')
            break;
        j.pos++; /* ',' */
    }
    return have_host && have_port ? EMX_AO_OK : EMX_AO_EBODY;
}

/* ---- builders ---- */

/* A bounded writer: once anything does not fit, every later put is a no-op
 * and the builder returns 0. */
struct writer {
    uint8_t *buf;
    size_t cap;
    size_t pos;
    bool fail;
};

static void put_u8(struct writer *w, uint8_t v)
{
    if (w->fail || w->cap - w->pos < 1) {
        w->fail = true;
        return;
    }
    w->buf[w->pos++] = v;
}

static void put_u16(struct writer *w, uint16_t v)
{
    if (w->fail || w->cap - w->pos < 2) {
        w->fail = true;
        return;
    }
    emx_ao_put_u16(w->buf + w->pos, v);
    w->pos += 2;
}

static void put_bytes(struct writer *w, const void *p, size_t n)
{
    if (w->fail || w->cap - w->pos < n) {
        w->fail = true;
        return;
    }
    if (n)
        memcpy(w->buf + w->pos, p, n);
    w->pos += n;
}

static void put_str(struct writer *w, const void *s, size_t len)
{
    size_t n = w->fail ? 0 : emx_ao_write_str(w->buf + w->pos, w->cap - w->pos, s, len);
    if (n == 0)
        w->fail = true;
    w->pos += n;
}

static void put_header(struct writer *w, uint8_t code, uint32_t request_id, uint32_t endpoint_id,
                       uint32_t session_id)
{
    struct emx_ao_header h = {
        .version = EMX_AO_VERSION,
        .code = code,
        .request_id = request_id,
        .endpoint_id = endpoint_id,
        .session_id = session_id,
    };
    size_t n = w->fail ? 0 : emx_ao_header_write(w->buf + w->pos, w->cap - w->pos, &h);
    if (n == 0)
        w->fail = true;
    w->pos += n;
}

static size_t finish(const struct writer *w)
{
    return w->fail ? 0 : w->pos;
}

size_t emx_ao_build_response(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                             uint32_t endpoint_id, uint32_t session_id, const char *reason)
{
    struct writer w = {buf, cap, 0, false};
    put_header(&w, code, request_id, endpoint_id, session_id);
    if (reason) {
        put_u8(&w, 1);
        put_str(&w, reason, strlen(reason));
    } else {
        put_u8(&w, 0);
    }
    put_u8(&w, EMX_BT_NOTHING);
    return finish(&w);
}

size_t emx_ao_response_size(size_t reason_len)
{
    return EMX_AO_HEADER_SIZE + 1 + emx_ao_str_size(reason_len) + 1;
}

size_t emx_ao_build_auth(uint8_t *buf, size_t cap, uint32_t request_id, uint32_t endpoint_id,
                         const char *app_key, size_t key_len)
{
    struct writer w = {buf, cap, 0, false};
    put_header(&w, EMX_AO_AUTH, request_id, endpoint_id, EMX_AO_AUTH_SESSION);
    put_u8(&w, 1);
    put_str(&w, "appKey", 6);
    put_str(&w, app_key, key_len);
    return finish(&w);
}

size_t emx_ao_build_bind(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                         uint32_t endpoint_id, uint32_t session_id, const struct emx_ao_str *names,
                         size_t count)
{
    if ((code != EMX_AO_BIND && code != EMX_AO_UNBIND) || count > UINT16_MAX ||
        (count > 0 && names == NULL))
        return 0;
    struct writer w = {buf, cap, 0, false};
    put_header(&w, code, request_id, endpoint_id, session_id);
    put_u8(&w, 0); /* no gateway */
    put_u16(&w, (uint16_t)count);
    for (size_t i = 0; i < count; i++)
        put_str(&w, names[i].ptr, names[i].len);
    return finish(&w);
}

size_t emx_ao_build_request(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                            uint32_t endpoint_id, uint32_t session_id, uint8_t entity_type,
                            const char *entity_name, uint8_t characteristic, const char *name,
                            const uint8_t *params, size_t params_len)
{
    if (emx_ao_is_response(code) || entity_name == NULL || name == NULL)
        return 0;
    struct writer w = {buf, cap, 0, false};
    put_header(&w, code, request_id, endpoint_id, session_id);
    put_u8(&w, entity_type);
    put_str(&w, entity_name, strlen(entity_name));
    put_u8(&w, characteristic);
    put_str(&w, name, strlen(name));
    put_u8(&w, 0); /* no headers */
    if (params) {
        put_u8(&w, EMX_BT_INFOTABLE);
        put_bytes(&w, params, params_len);
    } else {
        put_u8(&w, EMX_BT_NOTHING);
    }
    return finish(&w);
}
