/* The edge hop's HTTP upgrade (RFC 6455 §4.2) and permessage-deflate
 * negotiation (RFC 7692 §7.1), without I/O. The request line and headers
 * are parsed by http-parser; what they must say is checked here. */
#ifndef EMX_WS_EDGE_HTTP_H
#define EMX_WS_EDGE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EDGE_HTTP_MAX_HEAD 8192 /* request line and headers; more: 431 */

/* What the listener accepts of permessage-deflate. */
struct edge_pmd_conf {
    bool enabled;
    uint8_t server_window; /* bits edgemux compresses with (9..15) */
    uint8_t client_window; /* bits asked of a client that offers client_max_window_bits */
};

/* The agreed permessage-deflate parameters. */
struct edge_pmd {
    bool on;
    bool server_no_takeover; /* edgemux resets its compressor per message */
    bool client_no_takeover; /* the client resets: edgemux's inflater too */
    bool client_window_set;  /* client_max_window_bits is in the response */
    uint8_t server_window;
    uint8_t client_window; /* the client's window: edgemux inflates with it */
};

struct edge_http_req {
    int status;         /* 0: upgrade; otherwise the HTTP status to answer */
    const char *why;    /* static text naming what was wrong (logs) */
    char accept[32];    /* Sec-WebSocket-Accept for the response */
    char app_key[1024]; /* a secret: never logged; "" when absent */
    bool has_app_key;
    char xff[1024]; /* X-Forwarded-For as received (lines joined) */
    bool has_xff;
    uint32_t max_frame; /* Max-Frame-Size; 0: none */
    struct edge_pmd pmd;
};

/* Length of the head (through the blank line) if `buf` holds a whole one,
 * 0 if more is needed, -1 if none fits in EDGE_HTTP_MAX_HEAD. */
long edge_http_head_len(const char *buf, size_t len);

/* Check a whole head against `path` (a query string is ignored) and
 * negotiate permessage-deflate. Fills `out`; out->status says the outcome. */
void edge_http_parse(const char *head, size_t len, const char *path,
                     const struct edge_pmd_conf *pmd, struct edge_http_req *out);

/* The 101 response for an accepted request. Returns its length, or 0 if
 * `cap` is too small. */
size_t edge_http_101(const struct edge_http_req *r, char *out, size_t cap);

/* A refusal: status line, the headers that status needs, Connection: close. */
size_t edge_http_refusal(int status, char *out, size_t cap);

#endif
