/* The edge upgrade: request checks, permessage-deflate negotiation and the
 * answers. */
#include "edge_http.h"

#include <ctype.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <http_parser.h>
#include <openssl/evp.h>

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

long edge_http_head_len(const char *buf, size_t len)
{
    size_t n = len < EDGE_HTTP_MAX_HEAD ? len : EDGE_HTTP_MAX_HEAD;

    for (size_t i = 3; i < n; i++)
        if (buf[i] == '\n' && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r')
            return (long)(i + 1);
    return len >= EDGE_HTTP_MAX_HEAD ? -1 : 0;
}

/* ---- header collection ---------------------------------------------------- */

enum hdr_id {
    H_OTHER,
    H_HOST,
    H_UPGRADE,
    H_CONNECTION,
    H_KEY,
    H_VERSION,
    H_EXTENSIONS,
    H_APPKEY,
    H_MAXFRAME,
    H_XFF,
    H_COOKIE,
    H_USER_AGENT,
    H_ACCEPT,
    H__COUNT
};

static const char *const hdr_names[H__COUNT] = {
    "",
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "appkey",
    "max-frame-size",
    "x-forwarded-for",
    "cookie",
    "user-agent",
    "sec-websocket-accept",
};

/* Headers that may appear once; the others are lists joined with ", ". */
static const bool hdr_single[H__COUNT] = {
    [H_HOST] = true,   [H_KEY] = true,    [H_VERSION] = true,    [H_APPKEY] = true,
    [H_MAXFRAME] = true, [H_COOKIE] = true, [H_USER_AGENT] = true, [H_ACCEPT] = true,
};

struct collect {
    char url[1024];
    size_t url_len;
    bool url_long;
    char field[32];
    size_t field_len;
    bool field_long;
    bool in_value;
    enum hdr_id cur;
    unsigned count[H__COUNT];
    char *val[H__COUNT]; /* into store: lists may take a whole head, others 1 KiB */
    size_t val_cap[H__COUNT];
    size_t val_len[H__COUNT];
    bool val_long[H__COUNT];
    bool done;
    char store[3 * EDGE_HTTP_MAX_HEAD + 10 * 1024];
};

static const bool hdr_list_big[H__COUNT] = {
    [H_EXTENSIONS] = true, [H_XFF] = true, [H_COOKIE] = true};

static void collect_init(struct collect *c)
{
    size_t at = 0;

    memset(c, 0, offsetof(struct collect, store));
    for (int i = 1; i < H__COUNT; i++) {
        c->val[i] = c->store + at;
        c->val_cap[i] = hdr_list_big[i] ? EDGE_HTTP_MAX_HEAD : 1024;
        c->val[i][0] = '\0';
        at += c->val_cap[i];
    }
}

static void append(char *dst, size_t *len, bool *toolong, size_t cap, const char *at, size_t n)
{
    if (n >= cap - *len) {
        *toolong = true;
        n = cap - 1 - *len;
    }
    memcpy(dst + *len, at, n);
    *len += n;
    dst[*len] = '\0';
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct collect *c = p->data;

    append(c->url, &c->url_len, &c->url_long, sizeof(c->url), at, n);
    return 0;
}

static int on_field(http_parser *p, const char *at, size_t n)
{
    struct collect *c = p->data;

    if (c->in_value) {
        c->in_value = false;
        c->field_len = 0;
        c->field_long = false;
        c->field[0] = '\0';
    }
    append(c->field, &c->field_len, &c->field_long, sizeof(c->field), at, n);
    return 0;
}

static int on_value(http_parser *p, const char *at, size_t n)
{
    struct collect *c = p->data;

    if (!c->in_value) {
        c->in_value = true;
        c->cur = H_OTHER;
        if (!c->field_long)
            for (int i = 1; i < H__COUNT; i++)
                if (!strcasecmp(c->field, hdr_names[i]))
                    c->cur = (enum hdr_id)i;
        if (c->cur == H_OTHER)
            return 0;
        if (c->count[c->cur]++ && !hdr_single[c->cur])
            append(c->val[c->cur], &c->val_len[c->cur], &c->val_long[c->cur], c->val_cap[c->cur],
                   ", ", 2);
    }
    if (c->cur != H_OTHER)
        append(c->val[c->cur], &c->val_len[c->cur], &c->val_long[c->cur], c->val_cap[c->cur], at,
               n);
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    struct collect *c = p->data;

    c->done = true;
    return 0;
}

/* ---- small parsers --------------------------------------------------------- */

static bool is_tchar(int ch)
{
    return isalnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static const char *skip_ws(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

/* Is `tok` one of the comma-separated tokens of `list` (case-insensitive)? */
static bool list_has(const char *list, const char *tok)
{
    size_t tl = strlen(tok);
    const char *s = list;

    while (*s) {
        const char *e;

        s = skip_ws(s);
        e = s;
        while (*e && *e != ',')
            e++;
        {
            const char *t = e;

            while (t > s && (t[-1] == ' ' || t[-1] == '\t'))
                t--;
            if ((size_t)(t - s) == tl && !strncasecmp(s, tok, tl))
                return true;
        }
        s = *e ? e + 1 : e;
    }
    return false;
}

static bool key_valid(const char *k)
{
    unsigned char raw[20];
    size_t n = strlen(k);
    int out;

    if (n != 24 || k[22] != '=' || k[23] != '=')
        return false;
    for (size_t i = 0; i < 22; i++)
        if (!isalnum((unsigned char)k[i]) && k[i] != '+' && k[i] != '/')
            return false;
    out = EVP_DecodeBlock(raw, (const unsigned char *)k, 24);
    return out == 18; /* 16 bytes and the two padding bytes */
}

static void accept_of(const char *key, char out[32])
{
    char buf[64];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    snprintf(buf, sizeof(buf), "%s%s", key, ws_guid);
    if (!EVP_Digest(buf, strlen(buf), md, &mdlen, EVP_sha1(), NULL) || mdlen != 20) {
        out[0] = '\0';
        return;
    }
    EVP_EncodeBlock((unsigned char *)out, md, 20);
}

/* ---- permessage-deflate (RFC 7692 §7.1) ----------------------------------- */

struct pmd_offer {
    bool server_no_takeover, client_no_takeover;
    int server_bits; /* -1: absent */
    int client_bits; /* -1: absent, 0: present without a value */
};

/* One parameter value: a token or a quoted string (RFC 7692 §7.1: the
 * value must read as a token after unquoting). Returns its length in
 * `val`, or -1. */
static int param_value(const char **sp, char *val, size_t cap)
{
    const char *s = *sp;
    size_t n = 0;

    if (*s == '"') {
        s++;
        while (*s && *s != '"') {
            if (*s == '\\' && s[1])
                s++;
            if (n + 1 >= cap)
                return -1;
            val[n++] = *s++;
        }
        if (*s != '"')
            return -1;
        s++;
    } else {
        while (is_tchar((unsigned char)*s)) {
            if (n + 1 >= cap)
                return -1;
            val[n++] = *s++;
        }
    }
    val[n] = '\0';
    *sp = s;
    return (int)n;
}

static int bits_of(const char *v)
{
    /* RFC 7692 §7.1.2: a decimal integer without leading zeros */
    if ((strlen(v) != 1 && strlen(v) != 2) || v[0] == '0')
        return -1;
    for (const char *p = v; *p; p++)
        if (!isdigit((unsigned char)*p))
            return -1;
    {
        int b = atoi(v);

        return b >= 8 && b <= 15 ? b : -1;
    }
}

/* Parse one offer's parameters from `s` (after the name) up to its ',' or
 * the end. Returns false if the offer must be declined; *sp is left after
 * it either way (or at the end when the syntax is lost). */
static bool offer_params(const char **sp, struct pmd_offer *o)
{
    const char *s = *sp;
    bool ok = true;

    o->server_no_takeover = o->client_no_takeover = false;
    o->server_bits = o->client_bits = -1;
    for (;;) {
        char name[40], val[8];
        size_t nl = 0;
        bool has_val = false;

        s = skip_ws(s);
        if (!*s || *s == ',')
            break;
        if (*s != ';') {
            ok = false;
            break;
        }
        s = skip_ws(s + 1);
        while (is_tchar((unsigned char)*s)) {
            if (nl + 1 < sizeof(name))
                name[nl] = *s;
            else
                ok = false;
            nl++;
            s++;
        }
        name[nl < sizeof(name) ? nl : sizeof(name) - 1] = '\0';
        if (!nl) {
            ok = false;
            break;
        }
        s = skip_ws(s);
        if (*s == '=') {
            s = skip_ws(s + 1);
            has_val = true;
            if (param_value(&s, val, sizeof(val)) < 0) {
                ok = false;
                break;
            }
        }
        if (!strcasecmp(name, "server_no_context_takeover") && !has_val && !o->server_no_takeover) {
            o->server_no_takeover = true;
        } else if (!strcasecmp(name, "client_no_context_takeover") && !has_val &&
                   !o->client_no_takeover) {
            o->client_no_takeover = true;
        } else if (!strcasecmp(name, "server_max_window_bits") && has_val && o->server_bits < 0 &&
                   bits_of(val) > 0) {
            o->server_bits = bits_of(val);
        } else if (!strcasecmp(name, "client_max_window_bits") && o->client_bits < 0 &&
                   (!has_val || bits_of(val) > 0)) {
            o->client_bits = has_val ? bits_of(val) : 0;
        } else {
            ok = false; /* unknown, repeated or invalid: decline the offer */
        }
    }
    if (!ok) {
        /* skip the rest of this offer, minding quoted strings */
        bool q = false;

        while (*s && (q || *s != ',')) {
            if (*s == '\\' && q && s[1])
                s++;
            else if (*s == '"')
                q = !q;
            s++;
        }
    }
    *sp = s;
    return ok;
}

/* Take the first acceptable permessage-deflate offer of the list. */
static void negotiate(const char *list, const struct edge_pmd_conf *conf, struct edge_pmd *out)
{
    const char *s = list;

    memset(out, 0, sizeof(*out));
    if (!conf || !conf->enabled)
        return;
    while (*s) {
        const char *name;
        size_t nl;
        struct pmd_offer o;
        bool ok;

        s = skip_ws(s);
        name = s;
        while (is_tchar((unsigned char)*s))
            s++;
        nl = (size_t)(s - name);
        ok = offer_params(&s, &o);
        if (*s == ',')
            s++;
        if (!ok || nl != 18 || strncasecmp(name, "permessage-deflate", 18))
            continue;
        /* zlib cannot compress with a 256-byte window */
        if (o.server_bits == 8)
            continue;
        out->on = true;
        out->server_window = conf->server_window;
        if (o.server_bits > 0 && o.server_bits < out->server_window)
            out->server_window = (uint8_t)o.server_bits;
        out->server_no_takeover = o.server_no_takeover;
        out->client_no_takeover = o.client_no_takeover;
        out->client_window = 15;
        if (o.client_bits >= 0) {
            uint8_t w = conf->client_window ? conf->client_window : 15;

            if (o.client_bits > 0 && o.client_bits < w)
                w = (uint8_t)o.client_bits;
            /* RFC 7692 §7.1.2.2: never more than the client offered, 8
             * included (edge_rx inflates that with 9: a larger window
             * is always right) */
            out->client_window = w;
            out->client_window_set = true;
        }
        return;
    }
}

/* ---- the request ----------------------------------------------------------- */

/* RFC 9112 §3: method SP request-target SP HTTP-version CRLF, one space
 * each; http-parser alone lets doubled spaces through. */
static bool request_line_strict(const char *head, size_t len)
{
    size_t i = 0, spaces = 0;

    for (; i < len && head[i] != '\r'; i++) {
        if (head[i] == ' ') {
            if (i == 0 || head[i - 1] == ' ')
                return false;
            spaces++;
        } else if ((unsigned char)head[i] <= 0x20 || head[i] == 0x7f) {
            return false;
        }
    }
    return spaces == 2 && i + 1 < len && head[i + 1] == '\n' && head[i - 1] != ' ';
}

static void refuse(struct edge_http_req *r, int status, const char *why)
{
    r->status = status;
    r->why = why;
}

/* RFC 3986 pchar without percent-encoding or ':'/'@' ambiguity: what a
 * tid may hold to stand verbatim in a path (the SDK escapes nothing). */
static bool tid_char(int ch)
{
    return isalnum(ch) || (ch && strchr("-._~!$&'()*+,;=", ch));
}

/* A tunnel path: which side, and its tid. Returns 0 (not one), 1 (one,
 * tid copied) or -1 (one whose tid is not acceptable). */
static int tunnel_path(const char *url, size_t plen, struct edge_http_req *out)
{
    static const char *const prefixes[] = {NULL, EDGE_TUNNEL_SERVER_PATH,
                                           EDGE_TUNNEL_CLIENT_PATH};

    for (int side = EDGE_TUNNEL_SERVER; side <= EDGE_TUNNEL_CLIENT; side++) {
        size_t n = strlen(prefixes[side]);

        if (plen < n || strncmp(url, prefixes[side], n))
            continue;
        if (plen == n || plen - n > EDGE_TID_MAX)
            return -1;
        for (size_t i = n; i < plen; i++)
            if (!tid_char((unsigned char)url[i]))
                return -1;
        out->tunnel = side;
        memcpy(out->tid, url + n, plen - n);
        out->tid[plen - n] = '\0';
        return 1;
    }
    return 0;
}

void edge_http_parse(const char *head, size_t len, const char *path, bool tunnels,
                     const struct edge_pmd_conf *pmd, struct edge_http_req *out)
{
    http_parser_settings set;
    http_parser p;
    struct collect *c;
    size_t n, plen;
    char *q;

    memset(out, 0, sizeof(*out));
    if (!request_line_strict(head, len)) {
        refuse(out, 400, "malformed request line");
        return;
    }
    c = malloc(sizeof(*c));
    if (!c) {
        refuse(out, 503, "out of memory");
        return;
    }
    collect_init(c);
    memset(&set, 0, sizeof(set));
    set.on_url = on_url;
    set.on_header_field = on_field;
    set.on_header_value = on_value;
    set.on_headers_complete = on_headers_complete;
    http_parser_init(&p, HTTP_REQUEST);
    p.data = c;
    n = http_parser_execute(&p, &set, head, len);
    (void)n;
    if (!c->done || HTTP_PARSER_ERRNO(&p) != HPE_OK) {
        refuse(out, 400, "malformed request");
        goto done;
    }
    /* RFC 9110 §5.5: whitespace around a value is not part of it;
     * http-parser drops the leading but keeps the trailing */
    for (int i = 1; i < H__COUNT; i++)
        while (c->val_len[i] &&
               (c->val[i][c->val_len[i] - 1] == ' ' || c->val[i][c->val_len[i] - 1] == '\t'))
            c->val[i][--c->val_len[i]] = '\0';
    if (p.method != HTTP_GET) {
        refuse(out, 405, "method is not GET");
        goto done;
    }
    if (p.http_major != 1 || p.http_minor != 1) {
        refuse(out, 400, "not HTTP/1.1");
        goto done;
    }
    if (c->url_long) {
        refuse(out, 414, "request target too long");
        goto done;
    }
    q = strchr(c->url, '?');
    plen = q ? (size_t)(q - c->url) : c->url_len;
    if (!path || strlen(path) != plen || strncmp(c->url, path, plen)) {
        int t = tunnels ? tunnel_path(c->url, plen, out) : 0;

        if (t == 0) {
            refuse(out, 404, "path not served");
            goto done;
        }
        if (t < 0) {
            refuse(out, 404, "tunnel id not acceptable");
            goto done;
        }
    }
    for (int i = 1; i < H__COUNT; i++) {
        if (c->val_long[i]) {
            refuse(out, 431, "header too long");
            goto done;
        }
        if (hdr_single[i] && c->count[i] > 1) {
            refuse(out, 400, "repeated header");
            goto done;
        }
    }
    if (c->val_len[H_XFF] >= sizeof(out->xff) || c->val_len[H_APPKEY] >= sizeof(out->app_key) ||
        c->val_len[H_COOKIE] >= sizeof(out->cookie) ||
        c->val_len[H_USER_AGENT] >= sizeof(out->user_agent)) {
        refuse(out, 431, "header too long");
        goto done;
    }
    if (!c->count[H_HOST]) {
        refuse(out, 400, "no Host header");
        goto done;
    }
    if (!list_has(c->val[H_UPGRADE], "websocket")) {
        refuse(out, 400, "not a WebSocket upgrade");
        goto done;
    }
    if (!list_has(c->val[H_CONNECTION], "upgrade")) {
        refuse(out, 400, "Connection does not name Upgrade");
        goto done;
    }
    if (!key_valid(c->val[H_KEY])) {
        refuse(out, 400, "invalid Sec-WebSocket-Key");
        goto done;
    }
    if (strcmp(c->val[H_VERSION], "13")) {
        refuse(out, 426, "Sec-WebSocket-Version is not 13");
        goto done;
    }
    accept_of(c->val[H_KEY], out->accept);
    if (!out->accept[0]) {
        refuse(out, 503, "digest failed");
        goto done;
    }
    if (c->count[H_APPKEY]) {
        out->has_app_key = true;
        memcpy(out->app_key, c->val[H_APPKEY], c->val_len[H_APPKEY] + 1);
    }
    if (c->count[H_XFF]) {
        out->has_xff = true;
        memcpy(out->xff, c->val[H_XFF], c->val_len[H_XFF] + 1);
    }
    if (c->count[H_MAXFRAME]) {
        char *end;
        unsigned long v = strtoul(c->val[H_MAXFRAME], &end, 10);

        if (end != c->val[H_MAXFRAME] && *end == '\0' && v > 0)
            out->max_frame = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    if (out->tunnel) {
        /* tunnel messages pass unchanged: no compression on either side */
        if (c->count[H_COOKIE]) {
            out->has_cookie = true;
            memcpy(out->cookie, c->val[H_COOKIE], c->val_len[H_COOKIE] + 1);
        }
        if (c->count[H_USER_AGENT]) {
            out->has_user_agent = true;
            memcpy(out->user_agent, c->val[H_USER_AGENT], c->val_len[H_USER_AGENT] + 1);
        }
    } else {
        negotiate(c->val[H_EXTENSIONS], pmd, &out->pmd);
    }
    out->status = 0;
    out->why = NULL;
done:
    /* the app key and cookies may have been copied into the collector */
    memset(c->val[H_APPKEY], 0, c->val_cap[H_APPKEY]);
    memset(c->val[H_COOKIE], 0, c->val_cap[H_COOKIE]);
    free(c);
}

/* ---- a tunnel back end's answer ---------------------------------------------- */

void edge_http_parse_response(const char *head, size_t len, const char *key,
                              struct edge_http_resp *out)
{
    http_parser_settings set;
    http_parser p;
    struct collect *c;
    char want[32];

    memset(out, 0, sizeof(*out));
    c = malloc(sizeof(*c));
    if (!c) {
        out->why = "out of memory";
        return;
    }
    collect_init(c);
    memset(&set, 0, sizeof(set));
    set.on_header_field = on_field;
    set.on_header_value = on_value;
    set.on_headers_complete = on_headers_complete;
    http_parser_init(&p, HTTP_RESPONSE);
    p.data = c;
    (void)http_parser_execute(&p, &set, head, len);
    /* a 101 ends the HTTP part; http-parser stops there with HPE_OK or
     * reports the upgrade */
    if (!c->done || (HTTP_PARSER_ERRNO(&p) != HPE_OK && !p.upgrade)) {
        out->why = "malformed response";
        goto done;
    }
    for (int i = 1; i < H__COUNT; i++)
        while (c->val_len[i] &&
               (c->val[i][c->val_len[i] - 1] == ' ' || c->val[i][c->val_len[i] - 1] == '\t'))
            c->val[i][--c->val_len[i]] = '\0';
    out->status = p.status_code;
    if (out->status != 101) {
        out->why = "refused";
        goto done;
    }
    accept_of(key, want);
    if (!list_has(c->val[H_UPGRADE], "websocket"))
        out->why = "101 without Upgrade: websocket";
    else if (!list_has(c->val[H_CONNECTION], "upgrade"))
        out->why = "101 without Connection: upgrade";
    else if (!want[0] || strcmp(c->val[H_ACCEPT], want))
        out->why = "wrong Sec-WebSocket-Accept";
    else if (c->count[H_EXTENSIONS] && c->val_len[H_EXTENSIONS])
        out->why = "101 with an extension not offered";
    else
        out->upgraded = true;
done:
    free(c);
}

size_t edge_http_101(const struct edge_http_req *r, char *out, size_t cap)
{
    char ext[160] = "";
    int n;

    if (r->pmd.on) {
        n = snprintf(ext, sizeof(ext),
                     "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=%u%s%s",
                     (unsigned)r->pmd.server_window,
                     r->pmd.server_no_takeover ? "; server_no_context_takeover" : "",
                     r->pmd.client_no_takeover ? "; client_no_context_takeover" : "");
        if (r->pmd.client_window_set && n > 0 && (size_t)n < sizeof(ext))
            snprintf(ext + n, sizeof(ext) - (size_t)n, "; client_max_window_bits=%u",
                     (unsigned)r->pmd.client_window);
        strncat(ext, "\r\n", sizeof(ext) - strlen(ext) - 1);
    }
    n = snprintf(out, cap,
                 "HTTP/1.1 101 Switching Protocols\r\n"
                 "Upgrade: websocket\r\n"
                 "Connection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n"
                 "%s\r\n",
                 r->accept, ext);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

size_t edge_http_refusal(int status, char *out, size_t cap)
{
    const char *text, *extra = "";
    int n;

    switch (status) {
    case 400:
        text = "Bad Request";
        break;
    case 401:
        text = "Unauthorized";
        break;
    case 403:
        text = "Forbidden";
        break;
    case 404:
        text = "Not Found";
        break;
    case 405:
        text = "Method Not Allowed";
        extra = "Allow: GET\r\n";
        break;
    case 408:
        text = "Request Timeout";
        break;
    case 414:
        text = "URI Too Long";
        break;
    case 426:
        text = "Upgrade Required";
        extra = "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n";
        break;
    case 429:
        text = "Too Many Requests";
        break;
    case 431:
        text = "Request Header Fields Too Large";
        break;
    case 502:
        text = "Bad Gateway";
        break;
    case 504:
        text = "Gateway Timeout";
        break;
    default:
        status = 503;
        text = "Service Unavailable";
        break;
    }
    n = snprintf(out, cap, "HTTP/1.1 %d %s\r\n%sContent-Length: 0\r\nConnection: close\r\n\r\n",
                 status, text, extra);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}
