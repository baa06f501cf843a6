/* A small WebSocket (RFC 6455) library on raw libuv TCP for the test tools:
 * the edge client and the platform simulator share it, so both ends frame
 * bytes exactly the same way and check what they receive strictly.
 *
 * It does what the ThingWorx C SDK does on the socket and nothing more:
 * client frames masked with an all-zero key, optional permessage-deflate with
 * context takeover both ways, fragmentation after compression, and a receive
 * side that can refuse frames larger than a Max-Frame-Size and 64-bit
 * lengths. A misbehaving peer never crashes it: every violation closes the
 * connection and leaves its reason in ws_conn.reason.
 *
 * One ws_conn per socket, allocated here and freed after on_close. Idle
 * connections hold no buffers: reads land in one per-thread scratch buffer
 * and only an incomplete frame is copied aside.
 */
#ifndef EMX_TOOLS_WS_H
#define EMX_TOOLS_WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define WS_OP_CONT   0x0
#define WS_OP_TEXT   0x1
#define WS_OP_BINARY 0x2
#define WS_OP_CLOSE  0x8
#define WS_OP_PING   0x9
#define WS_OP_PONG   0xA

#define WS_MAX_HEADERS 32
#define WS_MAX_HTTP    8192 /* largest upgrade request or response accepted */

enum ws_role { WS_CLIENT = 0, WS_SERVER = 1 };

enum ws_state {
    WS_CONNECTING = 0, /* TCP connect in progress (client) */
    WS_HANDSHAKE,      /* waiting for the upgrade request or response */
    WS_OPEN,
    WS_CLOSING, /* close frame sent or socket being closed */
    WS_CLOSED,
};

struct ws_str {
    const char *p;
    size_t n;
};

struct ws_http {
    struct ws_str method, path, version; /* request line (server side) */
    int status;                          /* response status (client side) */
    struct ws_str names[WS_MAX_HEADERS], values[WS_MAX_HEADERS];
    unsigned count;
};

/* Parse an HTTP/1.1 head. Returns its length including the blank line, 0 if
 * incomplete, -1 if malformed or over WS_MAX_HTTP. */
long ws_http_parse(const char *buf, size_t len, bool response, struct ws_http *out);
/* Value of header `name` (case-insensitive), or NULL. */
const struct ws_str *ws_http_header(const struct ws_http *h, const char *name);
bool ws_str_ieq(struct ws_str s, const char *c);
/* Does a comma-separated header value contain `token` (case-insensitive)? */
bool ws_str_has_token(struct ws_str s, const char *token);
/* Sec-WebSocket-Accept for a key: base64(SHA-1(key + GUID)), 28 chars + NUL. */
int ws_accept_key(const char *key, size_t key_len, char out[29]);

struct ws_conn;

struct ws_handlers {
    /* Client: the upgrade succeeded. Server: the upgrade was accepted. */
    void (*on_open)(struct ws_conn *c);
    /* A whole message (fragments joined, inflated). `data` is valid only
     * during the call. */
    void (*on_message)(struct ws_conn *c, int opcode, const uint8_t *data, size_t len);
    void (*on_ping)(struct ws_conn *c, const uint8_t *data, size_t len);
    void (*on_pong)(struct ws_conn *c, const uint8_t *data, size_t len);
    /* Server: decide on an upgrade request. Return 101 to accept (after
     * setting c->tx_max_frame etc. if wanted), or an HTTP status to refuse. */
    int (*on_upgrade)(struct ws_conn *c, const struct ws_http *req);
    /* The connection is gone; c is freed when this returns. c->reason says
     * why (static string). */
    void (*on_close)(struct ws_conn *c);
    /* All queued bytes went out (optional). */
    void (*on_drain)(struct ws_conn *c);
};

struct ws_client_opts {
    const char *host; /* Host header */
    const char *path;
    const char *app_key;       /* appKey header; NULL: none */
    uint32_t max_frame_size;   /* Max-Frame-Size header and receive limit; 0: none */
    bool deflate;              /* offer permessage-deflate */
    const char *extra_headers; /* raw "Name: value\r\n" lines, or NULL */
    /* A ThingWorx C SDK 2.2.1 tunnel socket (TUNNELS.md §3.3): the SDK's
     * header order, no compression, Upgrade and Connection each checked as
     * one case-insensitive value, the response head no larger than
     * max_frame_size, and every byte that came in the same read as the 101
     * discarded (counted in ws_conn.glued_bytes), as the SDK does. */
    bool sdk_tunnel;
};

struct ws_stats {
    uint64_t bytes_in, bytes_out; /* on the socket */
    uint64_t msgs_in, msgs_out;
    uint64_t frames_in;
    uint32_t max_frame_in; /* largest frame payload received */
};

struct ws_conn {
    uv_tcp_t tcp;
    const struct ws_handlers *h;
    void *user;
    uint8_t role, state;
    /* Receive policy. */
    bool reject_64bit;    /* drop the connection on a 64-bit length (SDK) */
    bool deflate;         /* permessage-deflate negotiated */
    bool closed_notified; /* on_close delivered */
    bool reading_paused;
    bool close_after_write;
    uint8_t rx_op; /* opcode of the message being assembled; 0: none */
    bool rx_compressed;
    bool tx_no_ctx, rx_no_ctx; /* no_context_takeover per direction */
    uint8_t tx_window_bits;
    uint32_t rx_max_frame;   /* refuse frames with a larger payload; 0: none */
    uint32_t tx_max_frame;   /* fragment what we send to this; 0: one frame */
    uint64_t rx_max_message; /* refuse messages larger than this (close 1009) */
    const char *reason;      /* why the connection ended (static string) */
    uint16_t close_code;     /* close code received, or 0 */
    uint16_t http_status;    /* client: status of a refused upgrade */
    bool sdk_tunnel;         /* client: see ws_client_opts.sdk_tunnel */
    uint64_t glued_bytes;    /* sdk_tunnel: bytes discarded with the 101 */
    char close_text[124];    /* reason text of the close frame received, NUL-ended */
    uint8_t glue[16];        /* server test hook: bytes sent in the same write as the 101 */
    uint8_t glue_len;
    /* Raw bytes not yet parsed (incomplete frame or HTTP head). */
    uint8_t *rbuf;
    size_t rlen, rcap;
    /* Message being assembled. */
    uint8_t *mbuf;
    size_t mlen, mcap;
    void *inflater, *deflater; /* z_stream *, created lazily */
    size_t queued;             /* bytes in pending uv_writes */
    char *accept;              /* client: expected Sec-WebSocket-Accept */
    struct ws_stats stats;
};

/* Accept a connection on a listening server; the conn starts in HANDSHAKE. */
struct ws_conn *ws_server_accept(uv_stream_t *server, const struct ws_handlers *h, void *user);
/* Start a client connection; `source` (may be NULL) is the local address to
 * bind. The upgrade is sent once TCP connects. NULL on immediate failure. */
struct ws_conn *ws_client_connect(uv_loop_t *loop, const struct sockaddr *dest,
                                  const struct sockaddr *source, const struct ws_client_opts *o,
                                  const struct ws_handlers *h, void *user);

/* Send one message (binary or text), compressed if negotiated, fragmented
 * to tx_max_frame. Returns 0, or -1 if the connection is not open. */
int ws_send(struct ws_conn *c, int opcode, const void *data, size_t len);
/* Send a control frame (ping/pong), never compressed. */
int ws_send_control(struct ws_conn *c, int opcode, const void *data, size_t len);
/* Send a close frame and close once it is written. */
void ws_close(struct ws_conn *c, uint16_t code, const char *reason);
/* Close the socket now; `reset` sends an RST instead of a FIN. */
void ws_abort(struct ws_conn *c, const char *reason, bool reset);
void ws_pause_read(struct ws_conn *c, bool pause);

/* Write raw bytes (used by tests that want to send something malformed). */
int ws_write_raw(struct ws_conn *c, const void *data, size_t len);
/* Encode frames for `data`; *out points into a per-thread buffer valid until
 * the next call. Returns the encoded length, 0 on allocation failure. */
size_t ws_encode(bool client, int opcode, bool rsv1, const uint8_t *data, size_t len,
                 uint32_t max_frame, uint8_t **out);
/* Free the per-thread buffers (at exit, for leak checkers). */
void ws_thread_cleanup(void);

#endif
