/* edgemux plugin SDK: transport plugins.
 *
 * A transport carries whole AlwaysOn messages over connections: edges
 * accepted on a listener, pipes connected to platform instances. One call of
 * on_message is one WebSocket message. The core counts the bytes it queued;
 * buffered() adds what the transport still holds (its own queue and the
 * kernel's unsent bytes), which drives the watermarks.
 *
 * Every function and callback runs on the loop thread.
 */
#ifndef EDGEMUX_TRANSPORT_H
#define EDGEMUX_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "edgemux/host.h"
#include "edgemux/option.h"
#include "edgemux/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

struct emx_conn;     /* one connection, owned by the transport */
struct emx_listener; /* one listening endpoint, owned by the transport */

/* What the transport learned about an accepted or connected peer. Borrowed
 * for the duration of the callback. */
struct emx_conn_info {
    const char *peer;           /* "ip:port" of the socket peer */
    const char *forwarded_for;  /* X-Forwarded-For as received, or NULL */
    const char *app_key;        /* appKey header, or NULL; a secret: never log it */
    uint32_t max_frame_size;    /* Max-Frame-Size the peer announced; 0: none */
    bool deflate;               /* permessage-deflate negotiated */
    bool tls;
};

/* ---- ABI 1.3: Remote Access tunnel sockets (docs/protocol.md §9) ----
 *
 * A listener that gets an upgrade for /Thingworx/WSTunnelServer/<tid> (a
 * device) or /Thingworx/WSTunnelClient/<tid> (a remote access client) asks
 * the core where it goes (on_tunnel). The transport then opens a dedicated
 * WebSocket to that instance, finishes its upgrade before the peer gets a
 * 101 (or passes the instance's refusal on), and relays messages unchanged
 * both ways on its own; the core hears when the tunnel opened and ended. */
enum emx_tunnel_side {
    EMX_TUNNEL_SIDE_SERVER = 1, /* WSTunnelServer: the device's socket */
    EMX_TUNNEL_SIDE_CLIENT = 2, /* WSTunnelClient: the remote access client's */
};

/* Borrowed for the call. */
struct emx_tunnel_request {
    enum emx_tunnel_side side;
    const char *tid;           /* the path after the prefix: RFC 3986 pchars, at most 300 bytes */
    const char *peer;          /* "ip:port" of the socket peer */
    const char *forwarded_for; /* X-Forwarded-For as received, or NULL */
    uint32_t max_frame_size;   /* Max-Frame-Size the peer announced; 0: none */
    bool tls;
};

struct emx_tunnel_route; /* below, after emx_connect_spec */

/* How a tunnel ended. Borrowed for the call. */
struct emx_tunnel_result {
    int status;         /* 0: relayed; else the HTTP status the peer got instead of a 101 */
    uint16_t code;      /* relayed: the close code the first side to close gave (1006: none) */
    const char *reason; /* that side's close reason, or why the upgrade was refused */
    bool owner_closed;  /* relayed: the instance's side closed first */
    uint64_t bytes_to_owner, bytes_to_peer; /* message payload bytes relayed */
    uint64_t msgs_to_owner, msgs_to_peer;
};

struct emx_conn_callbacks {
    /* Listener only: a peer finished its upgrade. Return the per-connection
     * user pointer for the callbacks below, or NULL to refuse (the transport
     * closes the connection). */
    void *(*on_accept)(void *listener_user, struct emx_conn *conn, const struct emx_conn_info *info);
    /* Connect only: the connection is open (upgrade done). */
    void (*on_open)(void *user, struct emx_conn *conn, const struct emx_conn_info *info);
    /* One whole binary message. `data` is borrowed for the call; the core may
     * modify it in place. */
    void (*on_message)(void *user, uint8_t *data, size_t len);
    /* Buffered bytes fell; the core may send more. */
    void (*on_writable)(void *user);
    /* The connection is gone (or a connect failed). No callback for this
     * connection follows; `conn` must not be used after this returns. */
    void (*on_close)(void *user, uint16_t code, const char *reason);

    /* ---- ABI 1.3, listener only; NULL: tunnel paths are answered 404 ---- */

    /* A peer asks for a tunnel path. Fill *route and return the tunnel's
     * user pointer, or return NULL with *status set (404 no such tunnel,
     * 503 its instance is not reachable, 429 over a limit) to refuse it.
     * `conn` is the peer's connection: close() ends the tunnel (both
     * sides); it stays valid until on_tunnel_end. */
    void *(*on_tunnel)(void *listener_user, struct emx_conn *conn,
                       const struct emx_tunnel_request *req, struct emx_tunnel_route *route,
                       int *status);
    /* An instance accepted and the peer got its 101: `target` 0 is the
     * route's target, i the alternate i-1. */
    void (*on_tunnel_open)(void *tunnel_user, size_t target);
    /* Both sides are gone (exactly once per accepted on_tunnel). */
    void (*on_tunnel_end)(void *tunnel_user, const struct emx_tunnel_result *res);
};

struct emx_listen_spec {
    const char *address;   /* "0.0.0.0:8080", "[::]:8443" */
    const char *path;      /* accepted upgrade path; others get 404 */
    const char *tls_cert;  /* PEM paths; NULL: plain ws */
    const char *tls_key;
    const char *tls_ca;           /* for client certificates; NULL: none asked */
    bool tls_require_client_cert;
    size_t max_message_size;      /* one WebSocket message over this closes 1009 */
    /* ABI 1.1 (read them only when host->abi_minor >= 1): the core's
     * settings. 0: the core has none, use your own. */
    uint64_t idle_timeout_ms;     /* edge.idle_timeout */
    int deflate;                  /* edge.deflate: 1 offer, -1 refuse, 0 unset */
    /* ABI 1.2 (read it only when host->abi_minor >= 2): the largest message
     * a connection may send before the core raises its limit with
     * set_message_limit() (edge.max_preauth_message); 0: no separate limit. */
    size_t max_preauth_message;
};

struct emx_connect_spec {
    const char *host;
    uint16_t port;
    const char *path;
    bool tls;
    const char *tls_ca;           /* NULL: system store */
    const char *tls_cert;         /* client certificate, or NULL */
    const char *tls_key;
    bool tls_verify;              /* verify chain and host name / IP SAN */
    const char *const *headers;   /* "Name: value" strings; borrowed for the call */
    size_t header_count;
    size_t max_message_size;
    uint32_t sndbuf;              /* SO_SNDBUF; 0: kernel default */
    /* ABI 1.1 (read them only when host->abi_minor >= 1); 0: use your own. */
    uint64_t ping_interval_ms;    /* platform.ping_interval */
    uint64_t idle_read_timeout_ms; /* platform.idle_read_timeout */
    uint64_t connect_timeout_ms;  /* platform.connect_timeout */
};

/* Filled by on_tunnel. The strings stay valid until on_tunnel_end. */
struct emx_tunnel_route {
    /* The owner instance: host, port, TLS, and the path to open there. The
     * headers ("Name: value") are added to the back end's upgrade. */
    struct emx_connect_spec target;
    /* Names of the peer's request headers passed on when present. */
    const char *const *copy_headers;
    size_t copy_header_count;
    uint64_t idle_timeout_ms; /* no message either way this long: both sides close 1001; 0: none */
    /* Instances to try in turn when the target answers 404 (an owner the
     * core could not name); the path, TLS files and headers of `target`
     * apply to each. Valid as long as the strings above. */
    const struct emx_connect_spec *alternates;
    size_t alternate_count;
};

struct emx_transport_plugin {
    struct emx_plugin_header hdr; /* kind EMX_PLUGIN_TRANSPORT */

    const struct emx_option *options; /* terminated by EMX_OPTION_END; may be NULL */
    size_t config_size;

    int (*create)(const struct emx_host *host, const void *config, void **instance);
    int (*start)(void *instance);
    void (*stop)(void *instance);
    void (*destroy)(void *instance);

    /* Open a listener. `cb` and `user` are borrowed until the listener closes. */
    int (*listen)(void *instance, const struct emx_listen_spec *spec,
                  const struct emx_conn_callbacks *cb, void *user, struct emx_listener **out);
    void (*unlisten)(struct emx_listener *listener);
    /* Start a connection; on_open or on_close follows. */
    int (*connect)(void *instance, const struct emx_connect_spec *spec,
                   const struct emx_conn_callbacks *cb, void *user, struct emx_conn **out);
    /* Queue one whole message. The bytes are borrowed for the call: the
     * transport copies what it cannot write at once. Returns 0 or -errno. */
    int (*send)(struct emx_conn *conn, const uint8_t *data, size_t len);
    /* Bytes accepted by send() and not yet handed to the peer (own queue plus
     * the kernel's unsent bytes). */
    size_t (*buffered)(struct emx_conn *conn);
    int (*pause_read)(struct emx_conn *conn, bool pause);
    /* Close with a WebSocket close code; on_close follows. */
    void (*close)(struct emx_conn *conn, uint16_t code, const char *reason);

    /* ---- ABI 1.1 (the core reads these only when hdr.struct_size covers them) ---- */

    /* Reload a TLS listener's certificate and key from these files (a
     * rotated certificate on SIGHUP), keeping every connection. Returns 0,
     * -ENOTSUP when this listener cannot change them in place (the core then
     * reports that a restart is needed), or another -errno. May be NULL. */
    int (*reload_tls)(struct emx_listener *listener, const char *cert, const char *key);

    /* ---- ABI 1.2 ---- */

    /* Raise (or lower) the largest message an accepted connection may send,
     * up to its listener's max_message_size; 0: that size. The core calls it
     * when an edge has authenticated. May be NULL. */
    int (*set_message_limit)(struct emx_conn *conn, size_t max_message_size);

    /* ---- ABI 1.4 ---- */

    /* Serve a socket that another worker's instance accepted and handed
     * off (host->edge_hand_off) as if this listener had accepted it. The
     * transport owns fd from the call on, also when it fails. May be NULL
     * (the core then refuses hand-offs to this transport). */
    int (*adopt)(struct emx_listener *listener, int fd);

    /* ---- ABI 1.5 ---- */

    /* What a tunnel has relayed so far: the byte and message counts of
     * struct emx_tunnel_result (the other fields are left alone), for a
     * `conn` given to on_tunnel and not yet ended. Counters of open tunnels
     * grow while they run, not only when they end. Returns 0, or -ENOENT
     * when conn is not a tunnel. May be NULL. */
    int (*tunnel_counts)(struct emx_conn *conn, struct emx_tunnel_result *sofar);
};

#ifdef __cplusplus
}
#endif
#endif
