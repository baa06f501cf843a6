/* Edges: the device side of the WebSocket transport. edgemux accepts the
 * sockets, reads the HTTP upgrade, speaks RFC 6455 + RFC 7692 and TLS
 * (OpenSSL) itself on the host's libuv loop; libwebsockets is not involved
 * (plugins/ws/README.md says why). One edge_hub per transport instance owns
 * the listeners, the edges and their timers. */
#ifndef EMX_WS_EDGE_H
#define EMX_WS_EDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include <edgemux/host.h>
#include <edgemux/transport.h>

/* struct emx_conn is shared by edges and pipes; its first byte says which. */
#define WS_KIND_PIPE 0
#define WS_KIND_EDGE 0xED

static inline bool ws_is_edge(const struct emx_conn *c)
{
    return c && *(const uint8_t *)c == WS_KIND_EDGE;
}

struct edge_settings {
    bool deflate;                /* accept permessage-deflate */
    uint8_t deflate_window_bits; /* edgemux's compression window */
    uint8_t inflate_window_bits; /* asked of clients that offer client_max_window_bits */
    uint8_t deflate_mem_level;
    uint64_t idle_timeout_ms; /* 0: never */
    uint64_t idle_sweep_period_ms;
    uint64_t keepalive_idle_ms, keepalive_interval_ms;
    int keepalive_count;
    uint64_t user_timeout_ms;
    uint32_t default_max_frame;
    uint64_t handshake_timeout_ms;
    uint64_t close_timeout_ms;
    unsigned handshake_pool;     /* sockets between accept and upgrade */
    uint64_t handshake_evict_ms; /* a full pool drops its oldest once this old */
    int listen_backlog;
    unsigned fd_reserve;
    size_t max_queued_control; /* pongs are not answered past this many queued bytes */
    /* tunnels */
    size_t tunnel_max_message;      /* largest message relayed either way */
    size_t tunnel_max_queued;       /* a side with this much queued stops the other's reading */
    uint64_t tunnel_connect_timeout_ms; /* owner's connect + upgrade; then 504 */
    uint64_t tunnel_data_delay_ms;  /* owner → peer data waits this long after the 101 went */
};

struct edge_hub;

struct edge_hub *edge_hub_new(uv_loop_t *loop, const struct emx_host *host,
                              const struct edge_settings *s);
int edge_hub_start(struct edge_hub *hub);
/* Stop accepting, drop every edge (on_close 1001 "shutdown"), close the
 * hub's handles. edge_hub_closed() tells when they are all closed. */
void edge_hub_stop(struct edge_hub *hub);
bool edge_hub_closed(const struct edge_hub *hub);
void edge_hub_free(struct edge_hub *hub);
/* The core's ABI 1.1 settings, applied where the options were left at
 * their defaults (ws.c decides which). */
struct edge_settings *edge_hub_settings(struct edge_hub *hub);
/* Take tunnel paths when the core knows of them (its ABI is 1.3 or later). */
void edge_hub_enable_tunnels(struct edge_hub *hub, bool on);

int edge_listen(struct edge_hub *hub, const struct emx_listen_spec *spec,
                const struct emx_conn_callbacks *cb, void *user, struct emx_listener **out);
void edge_unlisten(struct emx_listener *listener);
int edge_adopt(struct emx_listener *listener, int fd);
int edge_reload_tls(struct emx_listener *listener, const char *cert, const char *key);

int edge_send(struct emx_conn *conn, const uint8_t *data, size_t len);
size_t edge_buffered(struct emx_conn *conn);
int edge_pause_read(struct emx_conn *conn, bool pause);
void edge_close(struct emx_conn *conn, uint16_t code, const char *reason);
int edge_set_message_limit(struct emx_conn *conn, size_t limit);
/* transport op tunnel_counts: a tunnel peer's relayed counts so far */
int edge_tunnel_counts(struct emx_conn *conn, struct emx_tunnel_result *sofar);

#endif
