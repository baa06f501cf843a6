/* emx-transport-ws internals shared by the pipe files and the plugin:
 * options, the pipe connection (struct emx_conn for pipes), the instance.
 * Edges are edge.c's (edge.h); nothing here is seen by the core.
 *
 * Ownership and lifetime of a pipe:
 * - struct emx_conn is ours. It is attached to its lws wsi (as the wsi user
 *   pointer) until lws closes the wsi; then it is detached, put on a reap
 *   list and on_close is delivered from a uv_idle callback, so on_close never
 *   runs inside a send()/close()/connect() made by the core, and exactly once.
 * - Bytes given to send() are borrowed: written at once when nothing is
 *   queued and lws holds no partial frame, otherwise copied into the
 *   connection's queue (with LWS_PRE headroom, so lws_write needs no copy).
 */
#ifndef EMX_WS_INT_H
#define EMX_WS_INT_H

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <linux/sockios.h>

#include <libwebsockets.h>
#include <uv.h>

#include <edgemux/host.h>
#include <edgemux/option.h>
#include <edgemux/plugin.h>
#include <edgemux/transport.h>

#include "edge.h"
#include "ws_util.h"

#define WS_DEFAULT_FRAME 8192u
#define WS_MAX_FRAME     65535u /* above this a frame needs a 64-bit length */
#define WS_MIN_FRAME     64u
#define WS_REASON_MAX    123    /* close payload is at most 125 bytes with the code */
#define RAW_HDR_MAX      8      /* 2 + 16-bit length + mask key: frames stay <= 65535 */
#define BATCH_CAP        65536u /* gathered bytes per pipe before an early write */
#define BATCH_FRAME_MAX  16384u /* larger messages are written on their own */
#define PIPE_QUEUED_MIN  65536u
#define RAW_CTL_BUDGET   64 /* pings and pongs read from a raw pipe per pipe_timer tick */

struct ws_config {
    bool deflate;
    bool pipe_deflate;
    int64_t deflate_window_bits;
    int64_t deflate_mem_level;
    uint64_t edge_idle_timeout;
    uint64_t idle_sweep_period;
    uint64_t tcp_keepalive_idle;
    uint64_t tcp_keepalive_interval;
    int64_t tcp_keepalive_count;
    uint64_t tcp_user_timeout;
    uint64_t rx_buffer_size;
    uint64_t default_max_frame_size;
    uint64_t ping_interval;
    uint64_t idle_read_timeout;
    uint64_t pipe_max_queued;
    uint64_t handshake_timeout;
    uint64_t close_timeout;
    int64_t max_http_header_pool;
    int64_t listen_backlog;
    int64_t fd_reserve;
    int64_t inflate_window_bits;
    uint64_t handshake_evict;
    uint64_t max_queued_control;
    uint64_t tunnel_max_message;
    uint64_t tunnel_max_queued;
    uint64_t tunnel_connect_timeout;
    uint64_t tunnel_data_delay;
};

/* Defaults of the options the core's settings can stand in for. */
#define DEF_EDGE_IDLE_MS 120000
#define DEF_PING_MS      30000
#define DEF_IDLE_READ_MS 60000
#define DEF_HANDSHAKE_MS 10000

struct ws_qmsg {
    struct ws_qmsg *next;
    size_t len;    /* payload bytes */
    size_t off;    /* payload bytes already handed to lws */
    bool inflight; /* deflate: lws may still read this buffer */
    uint8_t buf[]; /* LWS_PRE headroom, then the payload */
};

enum ws_conn_state { CONN_CONNECTING, CONN_OPEN, CONN_GONE };

struct ws_instance;

struct emx_conn {
    uint8_t kind; /* WS_KIND_PIPE: first, see edge.h */
    struct ws_instance *inst;
    struct lws *wsi;
    const struct emx_conn_callbacks *cb;
    void *user;
    struct emx_conn *prev, *next; /* instance's list of attached connections */
    struct emx_conn *reap_next;
    enum ws_conn_state state;
    bool reported; /* the core knows this connection (accepted or connect returned) */
    bool closing;  /* close() was called: flush, then close with close_code */
    bool deflate;
    bool rx_in_msg; /* inside a fragmented message */
    bool rx_drop;   /* closing on this message (oversize or text) */
    bool was_queued;
    bool linked; /* on the instance's list */
    uint32_t max_frame;
    size_t max_msg;
    uint8_t *rx;
    size_t rx_len, rx_cap;
    struct ws_qmsg *qh, *qt;
    size_t qbytes;
    uint16_t close_code;
    char close_reason[WS_REASON_MAX + 1];
    /* Pipes without deflate run on an lws raw socket with our own RFC 6455
     * client framing: lws 4.1's client parser costs ~60 instructions per
     * received byte and it masks sent bytes one at a time. */
    bool raw;
    struct ws_pipe *pp; /* pipes only: edges, the many, do without it */
};

/* What only a pipe needs (~270 bytes an idle edge no longer carries). */
struct ws_pipe {
    char *hdrs; /* "Name: value\r\n"... */
    size_t hdrs_len;
    uint32_t sndbuf;
    bool raw_req_sent; /* upgrade request written */
    bool raw_hdr;      /* frame header complete, payload follows */
    bool raw_fin;
    uint8_t raw_op;
    uint8_t fh[14];
    uint8_t fh_len;
    uint8_t ctl_len;
    uint8_t ctl[125];
    uint64_t f_left;
    uint32_t rng;
    uint64_t last_rx, last_ping; /* uv_now() ms */
    char *req;                   /* upgrade request */
    size_t req_len;
    char accept[32];                /* expected Sec-WebSocket-Accept */
    struct emx_conn *pprev, *pnext; /* instance's list of raw pipes */
    /* Frames sent while the socket is idle gather here and go out in one
     * write per loop iteration (flush_pipes), however many edges sent. */
    uint8_t *batch; /* LWS_PRE headroom, then BATCH_CAP bytes */
    size_t batch_len;
    /* Connect by name: the lookup runs in libuv's thread pool (lws 4.1.6
     * would resolve synchronously on the loop), then lws dials the address. */
    struct ws_resolve *res; /* lookup this connect waits on, or NULL */
    struct emx_conn *rnext; /* next waiter of the same lookup */
    uint64_t res_deadline;  /* uv_now() ms: the lookup gives up */
    struct lws_vhost *vh;
    char *path, *hosthdr; /* "host:port", for Host, SNI and the name check */
    uint16_t port;
    int ssl_flags;
    /* Bounded work for a platform that stops reading (pipe_rx_update). */
    bool rx_paused;   /* lws reads nothing from it now */
    bool core_paused; /* pause_read() from the core */
    bool over_cap;    /* queue reached pipe_max_queued; cleared at half */
    bool ctl_paused;  /* over its control frame budget until the next tick */
    bool pong_owed;   /* raw: pong for the latest ping, sent when nothing waits */
    uint8_t pong_len;
    uint16_t ctl_count;       /* raw: pings and pongs read this tick */
    uint64_t ctl_flood_since; /* raw: first of the ticks that used up the budget; 0: none */
    uint64_t tx_ok;           /* uv_now() ms when writes last progressed or nothing waited */
    uint8_t pong[125];
    /* wss: why the platform's certificate failed the check, for the close
     * reason (lws's own line about it is off with several workers, ws.c) */
    const char *tls_verify_error;
};

/* One host name lookup. Connects to the same name share it; it outlives
 * connections that stop waiting (a running getaddrinfo cannot be stopped). */
struct ws_resolve {
    uv_getaddrinfo_t req;
    struct ws_instance *inst;
    struct ws_resolve *next;
    struct emx_conn *waiters; /* through pp->rnext */
    char host[];
};

struct ws_client_vhost {
    struct ws_client_vhost *next;
    struct lws_vhost *vh;
    char *ca, *cert, *key;
};

enum ws_inst_state { INST_CREATED, INST_RUNNING, INST_STOPPING, INST_STOPPED };

struct ws_instance {
    const struct emx_host *host;
    struct ws_config cfg;
    /* Options left at their defaults: the core's own settings (ABI 1.1 spec
     * fields) take their place; an option changed here wins. */
    bool core_idle, core_deflate, core_ping, core_idle_read, core_handshake;
    uint64_t pipe_tick; /* period of pipe_timer; 0: not running */
    uv_loop_t *loop;
    void *loops[1];
    struct lws_context *ctx;
    enum ws_inst_state state;
    bool lws_first_destroyed;
    unsigned teardown_ticks;
    int handles_open;
    uv_check_t check;
    uv_prepare_t flush_prep; /* writes gathered pipe frames before the loop polls */
    uv_idle_t reap;
    uv_timer_t sweep;
    uv_timer_t teardown;
    uv_timer_t pipe_timer; /* pings and silence checks of raw pipes */
    /* Edge sockets adopted by lws and not yet destroyed, and those of them
     * not yet upgraded; wsi opaque data points at one of the tags. */
    struct emx_conn *pipes;
    size_t pmd_conns;       /* open connections with permessage-deflate */
    struct emx_conn *conns; /* attached connections */
    struct emx_conn *sweep_cursor;
    size_t conn_count;
    struct emx_conn *reap_head, *reap_tail;
    struct edge_hub *edges; /* edges: accept, upgrade, framing (edge.c) */
    struct ws_client_vhost *cvhosts;
    struct ws_resolve *resolves; /* lookups under way */
    char res_failed[64];         /* last name that did not resolve, and when it was logged */
    uint64_t res_failed_logged;
    unsigned vhost_seq;
    struct lws *pmd_wsi; /* wsi whose permessage-deflate was just constructed */
    struct lws_protocols pipe_protocols[2];
    struct lws_extension pipe_exts[2];
    lws_retry_bo_t pipe_retry;
    lws_retry_bo_t raw_retry; /* all zero: raw pipes keep their own time */
    uint8_t *scratch;         /* LWS_PRE + a frame: direct writes of borrowed bytes */
};

#define LOG(inst_, lvl_, ...) (inst_)->host->log((inst_)->host, (lvl_), __VA_ARGS__)

/* pipe_lws.c */
void check_cb(uv_check_t *h);
void conn_free(struct emx_conn *c);
void conn_gone(struct emx_conn *c, uint16_t code, const char *reason);
void conn_kill(struct emx_conn *c, uint16_t code, const char *reason);
void conn_link(struct ws_instance *inst, struct emx_conn *c);
struct emx_conn *conn_new(struct ws_instance *inst);
void lws_kick(struct ws_instance *inst);
void on_client_established(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi);
int pmd_wrapper(struct lws_context *ctx, const struct lws_extension *ext, struct lws *wsi,
                enum lws_extension_callback_reasons reason, void *user, void *in, size_t len);
int queue_drain(struct emx_conn *c);
void reap_arm(struct ws_instance *inst);
void reap_flush(struct ws_instance *inst);
int rx_append(struct emx_conn *c, const uint8_t *in, size_t len);
int send_close_frame(struct emx_conn *c);
int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                size_t len);

/* pipe_raw.c */
void flush_pipes(struct ws_instance *inst);
void flush_prep_cb(uv_prepare_t *h);
size_t pipe_cap(const struct ws_instance *inst);
void pipe_rx_update(struct emx_conn *c);
void pipe_timer_cb(uv_timer_t *t);
int raw_build_request(struct emx_conn *c, const char *path, const char *hosthdr);
int raw_flush(struct emx_conn *c);
int raw_on_rx(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi, uint8_t *in,
              size_t len);
int raw_pong(struct emx_conn *c);
int raw_send(struct emx_conn *c, uint8_t op, const uint8_t *data, size_t len);

/* pipe_connect.c */
void resolve_detach(struct emx_conn *c);
void resolve_expire(struct ws_instance *inst, uint64_t now);
int ws_connect(void *instance, const struct emx_connect_spec *spec,
               const struct emx_conn_callbacks *cb, void *user, struct emx_conn **out);

/* pipe_lws.c: the transport calls for pipes */
int pipe_send(struct emx_conn *c, const uint8_t *data, size_t len);
size_t pipe_buffered(struct emx_conn *c);
int pipe_pause_read(struct emx_conn *c, bool pause);
void pipe_close(struct emx_conn *c, uint16_t code, const char *reason);

#endif
