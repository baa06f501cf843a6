/* Edge internals shared by edge.c (connections: I/O, close handshake,
 * timers, the transport calls), edge_accept.c (listeners, accept, the
 * handshake pool, TLS contexts) and edge_tx.c (framing and permessage-deflate
 * compression of what is sent). Not seen by the pipe files or the core. */
#ifndef EMX_WS_EDGE_INT_H
#define EMX_WS_EDGE_INT_H

#include "edge.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <linux/sockios.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <zlib.h>

#include "edge_http.h"
#include "edge_rx.h"
#include "ws_util.h"

#define RBUF_SIZE       65536u
#define READS_PER_EVENT 4   /* reads per readable event: other sockets get their turn */
#define ACCEPT_BATCH    64  /* accepts per listener event */
#define ACCEPT_PAUSE_MS 100 /* after EMFILE, ENFILE, ENOBUFS, ENOMEM */
#define TICK_MS         100
#define REASON_MAX      123    /* close payload is at most 125 bytes with the code */
#define MAX_FRAME_CAP   65535u /* above this a frame needs a 64-bit length edge SDKs drop */
#define MIN_FRAME       64u
#define KEEP_TBUF       (256u * 1024u) /* larger scratch buffers go back after use */

#define LOG(hub_, lvl_, ...) (hub_)->host->log((hub_)->host, (lvl_), __VA_ARGS__)

enum edge_state { ES_SHAKING, ES_OPEN, ES_CLOSING, ES_GONE };

struct oq {
    struct oq *next;
    size_t len, off;
    uint8_t data[];
};

struct edge_listener {
    struct edge_listener *next;
    struct edge_hub *hub;
    struct emx_conn_callbacks cb;
    void *user;
    char *path;
    char *cert, *key, *ca; /* TLS files, for reload_tls */
    bool require_client_cert;
    size_t max_msg; /* after AUTH */
    size_t preauth; /* before AUTH */
    SSL_CTX *ssl;
    struct edge_pmd_conf pmd;
    int port;
    int fd;
    uv_poll_t *poll; /* NULL once closing (freed by its close callback) */
    bool polling;
    bool closed;
};

struct edge_list {
    struct edge_conn *head, *tail;
    size_t n;
};

struct edge_conn {
    uint8_t kind; /* WS_KIND_EDGE: first, see edge.h */
    uint8_t state;
    uint8_t list;            /* which hub list holds it */
    unsigned reported : 1;   /* the core knows it (on_accept returned a user) */
    unsigned paused : 1;     /* the core asked us not to read */
    unsigned close_rcvd : 1; /* the peer's close frame arrived */
    unsigned close_sent : 1; /* our close frame (or refusal) is queued */
    unsigned shut : 1;       /* write side shut after the close */
    unsigned ready : 1;      /* on the hub's ready list */
    unsigned report_due : 1; /* closing: tell the core from the ready list */
    unsigned wrote : 1;      /* something was written during this read */
    unsigned big_rx : 1;     /* this read delivered a message of 4 KiB or more */
    unsigned ssl_want_write : 1;
    unsigned tunnel : 1;     /* one side of a tunnel: `user` is its struct tunnel */
    unsigned client : 1;     /* edgemux is the client (a tunnel's back end): frames masked */
    unsigned connecting : 1; /* a back end in TCP connect or TLS handshake */
    int events; /* what the poll handle watches */
    int fd;
    uint64_t t0; /* ms: handshake start, or close start */
    struct edge_hub *hub;
    struct edge_listener *lst;
    void *user;
    struct edge_conn *prev, *next;
    struct edge_conn *ready_next;
    SSL *ssl;
    char *hs; /* handshake bytes so far */
    uint16_t hs_len;
    uint16_t close_code;
    char *close_reason;
    uint32_t max_frame;
    size_t full_limit;
    struct edge_pmd pmd;
    struct edge_rx rx;
    z_stream *tx_z;
    struct oq *qh, *qt;
    size_t qbytes;
    uint8_t *held; /* input read while paused, parsed when resumed */
    size_t held_len, held_off;
    uv_poll_t poll;
};

enum { L_NONE, L_SHAKING, L_OPEN, L_CLOSING };

struct edge_hub {
    uv_loop_t *loop;
    const struct emx_host *host;
    struct edge_settings s;
    struct edge_listener *listeners;
    struct edge_list shaking, open, closing;
    struct edge_conn *sweep_cursor;
    struct edge_conn *ready_head;
    unsigned socks, sock_cap;
    bool balance; /* several workers: count sockets, hand some off (host.h) */
    bool running, stopped;
    bool accept_paused;
    uint64_t accept_err_logged;
    uint64_t last_sweep;
    int handles_open;
    uv_timer_t tick;
    uv_timer_t accept_retry;
    uv_idle_t ready_idle;
    uint8_t *rbuf;
    uint8_t *tbuf; /* framed output */
    size_t tcap;
    uint8_t *zbuf; /* compressed output */
    size_t zcap;
    /* tunnels (tunnel.c) */
    bool tunnels_on; /* the core takes tunnel paths (ABI >= 1.3) */
    uint64_t rng;    /* mask keys of back-end frames */
    size_t ntunnels;
    SSL_CTX *tun_ctx; /* client context of wss back ends, for the files below */
    char *tun_ca, *tun_cert, *tun_key;
    bool tun_verify;
};

static inline struct edge_conn *E(struct emx_conn *c)
{
    return (struct edge_conn *)(void *)c;
}

static inline struct emx_conn *C(struct edge_conn *c)
{
    return (struct emx_conn *)(void *)c;
}

/* edge.c */
void edge_conn_gone(struct edge_conn *c, uint16_t code, const char *reason);
void edge_conn_free(struct edge_conn *c);
int edge_write(struct edge_conn *c, const uint8_t *buf, size_t len);
int edge_drain(struct edge_conn *c);
int edge_send_op(struct edge_conn *c, uint8_t op, const uint8_t *data, size_t len);
void edge_start_close(struct edge_conn *c, uint16_t code, const char *reason);
void edge_refuse_http(struct edge_conn *c, int status, const char *why);
long edge_sock_read(struct edge_conn *c, uint8_t *buf, size_t cap);
void edge_ready_add(struct edge_conn *c);
void edge_conn_read(struct edge_conn *c);
void edge_hold(struct edge_conn *c, const uint8_t *buf, size_t len);
void edge_list_add(struct edge_conn *c, int which);
void edge_tune_socket(const struct edge_settings *s, int fd);
void edge_watch(struct edge_conn *c);

/* edge_tx.c */
int edge_compress(struct edge_conn *c, const uint8_t *data, size_t len, const uint8_t **out,
                  size_t *outlen);
size_t edge_frame(struct edge_conn *c, uint8_t op, bool rsv1, const uint8_t *data, size_t len);
void edge_tbuf_trim(struct edge_hub *hub);

/* tunnel.c: what edge.c hands a tunnel's connections to */
void tunnel_begin(struct edge_conn *dev, const struct edge_http_req *r);
int tunnel_rx(struct edge_conn *c, bool text, uint8_t *data, size_t len);
void tunnel_close_rcvd(struct edge_conn *c, uint16_t code, const char *reason);
void tunnel_side_failed(struct edge_conn *c);
void tunnel_drained(struct edge_conn *c);
void tunnel_conn_freed(struct edge_conn *c);
void tunnel_be_poll(struct edge_conn *be, int status, int events);
void tunnel_close(struct edge_conn *dev, uint16_t code, const char *reason);
int tunnel_counts(struct edge_conn *dev, struct emx_tunnel_result *sofar);
void tunnel_hub_free(struct edge_hub *hub);

/* edge_accept.c */
void edge_accept_modulate(struct edge_hub *hub);
void edge_listener_free(struct edge_listener *l);
void edge_listener_stop(struct edge_listener *l);
unsigned edge_socket_cap(struct edge_hub *hub);
unsigned edge_workers(const struct edge_hub *hub);

#endif
