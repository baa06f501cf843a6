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

/* Remote Access tunnel paths (TUNNELS.md §1): the tid follows the prefix. */
#define EDGE_TUNNEL_SERVER_PATH "/Thingworx/WSTunnelServer/"
#define EDGE_TUNNEL_CLIENT_PATH "/Thingworx/WSTunnelClient/"
#define EDGE_TID_MAX            300 /* a platform tid of 255 bytes and its token */
enum { EDGE_TUNNEL_NONE = 0, EDGE_TUNNEL_SERVER = 1, EDGE_TUNNEL_CLIENT = 2 };

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
    /* tunnel paths only (never negotiate compression) */
    int tunnel; /* EDGE_TUNNEL_*: the path's prefix */
    char tid[EDGE_TID_MAX + 1];
    char cookie[EDGE_HTTP_MAX_HEAD]; /* a secret: never logged */
    bool has_cookie;
    char user_agent[256];
    bool has_user_agent;
};

/* A tunnel back end's answer to its upgrade. */
struct edge_http_resp {
    int status;       /* the HTTP status; 0 when none could be read */
    bool upgraded;    /* a 101 that passes RFC 6455 §4.1's client checks */
    const char *why;  /* static text: what was wrong, when not upgraded */
};

/* Length of the head (through the blank line) if `buf` holds a whole one,
 * 0 if more is needed, -1 if none fits in EDGE_HTTP_MAX_HEAD. */
long edge_http_head_len(const char *buf, size_t len);

/* Check a whole head against `path` (a query string is ignored) and
 * negotiate permessage-deflate. With `tunnels`, the tunnel paths are
 * accepted too (out->tunnel, out->tid; no compression). Fills `out`;
 * out->status says the outcome. */
void edge_http_parse(const char *head, size_t len, const char *path, bool tunnels,
                     const struct edge_pmd_conf *pmd, struct edge_http_req *out);

/* Check a whole response head (to a request that sent Sec-WebSocket-Key
 * `key`, offering no extension). */
void edge_http_parse_response(const char *head, size_t len, const char *key,
                              struct edge_http_resp *out);

/* The 101 response for an accepted request. Returns its length, or 0 if
 * `cap` is too small. */
size_t edge_http_101(const struct edge_http_req *r, char *out, size_t cap);

/* A refusal: status line, the headers that status needs, Connection: close. */
size_t edge_http_refusal(int status, char *out, size_t cap);

#endif
