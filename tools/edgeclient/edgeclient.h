/* libedgeclient: an AlwaysOn edge client that behaves on the socket like the
 * ThingWorx C SDK (upgrade headers, zero-key masking, Max-Frame-Size and
 * 64-bit length checks, no answers to server pings, its own text pings,
 * SDK-style multipart and reconnect backoff), and keeps a ledger of every
 * request it sent with exactly one outcome each.
 *
 * Many clients share one libuv loop: each holds one uv_timer and, while
 * connected, one socket; buffers are allocated only while in use.
 */
#ifndef EMX_EDGECLIENT_H
#define EMX_EDGECLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <uv.h>

struct emx_edge_client;

enum edge_state {
    EDGE_DOWN = 0,   /* not connected (maybe waiting to reconnect) */
    EDGE_CONNECTING, /* TCP + upgrade */
    EDGE_AUTHING,    /* AUTH sent */
    EDGE_READY,      /* AUTH answered SUCCESS */
    EDGE_STOPPED,
};

enum edge_outcome {
    EDGE_PENDING = 0,     /* in flight */
    EDGE_ANSWERED,        /* answered(code) */
    EDGE_NO_ANSWER,       /* still pending when the ledger closed: a defect */
    EDGE_CONNECTION_LOST, /* our connection died with it in flight */
    EDGE_OUTCOME_COUNT,
};

enum edge_answer_mode {
    EDGE_ANSWER_ECHO = 0,  /* SUCCESS with the request's params, or answer_size bytes */
    EDGE_ANSWER_NOT_FOUND, /* NOT_FOUND to every platform request */
};

/* Characteristics of a request body. */
#define EDGE_CHAR_PROPERTIES 1
#define EDGE_CHAR_SERVICES   2
#define EDGE_CHAR_EVENTS     3
#define EDGE_ENTITY_THING    0x0A

struct edge_client_config {
    const char *url; /* ws://host:port/path */
    const char *app_key;
    const char *source_ip;              /* local address to bind, or NULL */
    uint32_t max_frame_size;            /* default 8192 */
    bool deflate;                       /* offer permessage-deflate */
    bool answer_pings;                  /* the SDK never does; default false */
    bool no_reconnect;                  /* default: reconnect like the SDK */
    uint32_t ping_interval_ms;          /* default 55000; UINT32_MAX: never */
    uint32_t pong_timeout_ms;           /* default 10000 */
    uint32_t chunk_size;                /* multipart chunk size, default 8192 */
    uint32_t max_connect_delay_ms;      /* random first delay up to this; default 10000 */
    uint32_t connect_retry_interval_ms; /* then retry every; default 5000 */
    uint32_t connect_timeout_ms;        /* connect + upgrade + AUTH; default 15000 */
    enum edge_answer_mode answer_mode;
    uint32_t answer_size;      /* echo answers carry this many bytes when non-zero */
    const char *extra_headers; /* raw "Name: value\r\n" lines added to the upgrade */
    /* Remote Access tunnels (TUNNELS.md §2-§6), served as the C SDK 2.2.1
     * does for bound Things: StartTunnel, CompleteTunnel,
     * TunnelCommandToEdge. */
    bool tunnels_off;     /* a library built without ENABLE_TUNNELING */
    uint32_t max_tunnels; /* concurrent tunnels per client; default 64 */
    void (*on_state)(struct emx_edge_client *c, enum edge_state s, void *user);
    void *user;
};

struct edge_ledger_entry {
    uint32_t request_id;
    uint8_t type;    /* request code */
    uint8_t outcome; /* enum edge_outcome */
    uint8_t code;    /* answer code when answered */
    uint8_t multipart;
    uint32_t latency_us; /* send to answer */
    uint64_t sent_ns;    /* uv_hrtime() */
    uint32_t conn_gen;   /* which connection carried it */
    void (*cb)(struct emx_edge_client *c, const struct edge_ledger_entry *e, void *arg);
    void *arg;
};

struct edge_ledger {
    struct edge_ledger_entry *entries; /* index = requestId - 1 */
    size_t count, cap;
    uint64_t by_outcome[EDGE_OUTCOME_COUNT];
    uint64_t by_code[256]; /* answered requests by answer code */
};

struct edge_client_stats {
    uint64_t connects, disconnects, auth_ok, auth_failed;
    uint64_t pings_sent, pongs_received, pings_ignored, pings_answered;
    uint64_t platform_requests, platform_answers;
    uint64_t refused_offline; /* _request while not READY */
    /* Things the server did wrong, as seen from the edge. */
    uint64_t unexpected_answers; /* unknown or duplicate requestId */
    uint64_t bad_messages;       /* unparseable header or body */
    uint64_t wrong_endpoint;     /* answer without endpointId 0 */
    uint64_t frames_in, bytes_in, bytes_out;
    uint32_t max_frame_in;   /* largest frame payload ever received */
    bool deflate_active;     /* permessage-deflate on the current/last connection */
    const char *last_reason; /* why the last connection ended */
    uint16_t last_http_status, last_close_code;
};

/* Tunnel counters: per tunnel, per client (every tunnel it ever had) and
 * summed by the caller over clients. Raw bytes are the TCP payload, before
 * base64 / after decoding. */
struct edge_tunnel_stats {
    uint64_t requests;        /* StartTunnel received for a bound Thing */
    uint64_t refused;         /* ... answered other than SUCCESS */
    uint64_t opened;          /* tunnel sockets upgraded (101) */
    uint64_t upgrade_refused; /* upgrade answered with a status other than 101 */
    uint64_t upgrade_failed;  /* TCP error, bad 101, timeout */
    uint64_t closed;          /* tunnels ended, for any reason */
    uint64_t active;          /* tunnels now */
    uint64_t cancels_sent, disconnects_sent;
    uint64_t control_failed; /* a CANCEL/DISCONNECT not sent: AlwaysOn not READY */
    uint64_t completes, commands; /* CompleteTunnel / TunnelCommandToEdge received */
    uint64_t bytes_to_platform, bytes_from_platform; /* raw */
    uint64_t msgs_to_platform, msgs_from_platform;
    uint64_t glued_bytes;      /* bytes that came in the same read as the 101 (dropped) */
    uint64_t binary_dropped;   /* binary messages from the platform (dropped) */
    uint64_t oversize_dropped; /* text messages decoding to more than chunksize */
    uint64_t bad_base64;       /* text messages that are not base64 */
    uint64_t no_target;        /* data while the local target was not connected */
    uint64_t target_connects, target_failures, target_write_errors;
    uint64_t server_closes, socket_errors, idle_timeouts, pings_ignored;
    uint64_t foreign_stop_reason; /* server close whose reason says "Tunnel stopped by edge" */
    uint16_t last_refused_status; /* HTTP status of the last refused upgrade */
    uint32_t max_frame_in;        /* largest frame payload received on a tunnel socket */
};

enum edge_tunnel_state {
    EDGE_TUN_UPGRADING = 0, /* tunnel socket connecting */
    EDGE_TUN_OPEN,
    EDGE_TUN_ENDING, /* CompleteTunnel: CANCEL sent, close frame next */
    EDGE_TUN_CLOSED,
};

struct edge_tunnel_info {
    char tid[256], thing[256];
    enum edge_tunnel_state state;
    bool target_connected;
    uint32_t chunksize, idle_timeout_ms;
    int32_t connects_left; /* negative: unlimited */
    struct edge_tunnel_stats stats;
};

typedef void (*edge_request_cb)(struct emx_edge_client *c, const struct edge_ledger_entry *e,
                                void *arg);

/* NULL on a bad config (unparseable URL, wss not built in). Strings are
 * copied. */
struct emx_edge_client *emx_edge_client_new(uv_loop_t *loop, const struct edge_client_config *cfg);
int emx_edge_client_start(struct emx_edge_client *c);
/* Close the ledger (pending → no_answer), then disconnect for good. */
void emx_edge_client_stop(struct emx_edge_client *c);
/* Stops if needed; memory goes once its handles have closed (run the loop). */
void emx_edge_client_free(struct emx_edge_client *c);
/* Drop the connection as if the network failed (tests); reconnects if
 * configured. */
void emx_edge_client_drop(struct emx_edge_client *c);

/* Send a request (GET/PUT/POST/DELETE) to Thing `thing`; `params` is an
 * InfoTable or NULL. Multipart if larger than chunk_size. Returns the
 * requestId, or 0 when not READY (nothing is recorded). */
uint32_t emx_edge_client_request(struct emx_edge_client *c, uint8_t type, const char *thing,
                                 uint8_t characteristic, const char *name, const uint8_t *params,
                                 size_t len, edge_request_cb cb, void *arg);
/* Remember Things and BIND them now if READY (and after every reconnect). */
int emx_edge_client_bind(struct emx_edge_client *c, const char *const *names, size_t n);
int emx_edge_client_unbind(struct emx_edge_client *c, const char *const *names, size_t n);

/* Pending requests become no_answer. Idempotent. */
void emx_edge_client_close_ledger(struct emx_edge_client *c);
const struct edge_ledger *emx_edge_client_ledger(const struct emx_edge_client *c);
/* Totals over all connections so far, the current one included. */
const struct edge_client_stats *emx_edge_client_stats(struct emx_edge_client *c);
enum edge_state emx_edge_client_state(const struct emx_edge_client *c);
uint32_t emx_edge_client_session(const struct emx_edge_client *c);
size_t emx_edge_client_pending(const struct emx_edge_client *c);
const char *emx_edge_outcome_name(enum edge_outcome o);

/* Tunnel counters of every tunnel the client had, live ones included. */
const struct edge_tunnel_stats *emx_edge_client_tunnel_stats(struct emx_edge_client *c);
/* Live tunnels: fills up to `max` entries, returns how many there are. */
size_t emx_edge_client_tunnels(struct emx_edge_client *c, struct edge_tunnel_info *out, size_t max);
/* Add a's counters to sum (active included; max_frame_in is the max). */
void emx_edge_tunnel_stats_add(struct edge_tunnel_stats *sum, const struct edge_tunnel_stats *a);

/* Write the ledger's entries as JSON objects (comma-separated, no brackets)
 * to f; `first` says whether no object precedes them. Returns 0 or -1. */
int emx_edge_ledger_write_json(const struct edge_ledger *l, const char *client_name, FILE *f,
                               bool first);

#endif
