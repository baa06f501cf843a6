/* The edge hop's receive side: RFC 6455 server-side frame parsing and
 * RFC 7692 permessage-deflate inflation, fed bytes split anywhere, giving
 * whole messages. No I/O: edge.c feeds it what the socket read, and the fuzz
 * target feeds it anything.
 *
 * Every quantity the peer controls is bounded: a message (after inflation)
 * never grows past the current limit (a frame that declares more is refused
 * at its header, an inflation that would produce more stops there), the
 * compressed bytes of one message are bounded too (empty deflate blocks cost
 * CPU without producing output), and control payloads are at most 125 bytes.
 * Any violation is an error carrying the close code of docs/protocol.md §5.
 */
#ifndef EMX_WS_EDGE_RX_H
#define EMX_WS_EDGE_RX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct z_stream_s;

/* What the receive side was asked to accept at the upgrade. */
struct edge_rx_params {
    bool deflate;        /* permessage-deflate negotiated */
    bool no_takeover;    /* client_no_context_takeover: a fresh inflater per message */
    uint8_t window_bits; /* the client's compression window (9..15) */
    bool text;           /* text messages are delivered (tunnels), not refused 1003 */
    bool from_server;    /* the peer is a server: frames must be unmasked (tunnel back ends) */
};

struct edge_rx {
    struct edge_rx_params p;
    size_t limit; /* largest message, after inflation */
    /* frame being read */
    uint8_t hdr[14];
    uint8_t hdr_len;
    bool in_frame; /* header done; `left` payload bytes follow */
    uint8_t op;    /* opcode of the frame being read */
    bool fin;
    uint8_t mask[4];
    uint8_t mask_pos;
    uint64_t left;
    /* message being assembled */
    bool in_msg;
    bool msg_text; /* the message being assembled is text */
    bool masked;   /* the frame being read is masked */
    bool compressed;
    uint8_t *msg;
    size_t msg_len, msg_cap;
    uint64_t wire;         /* compressed bytes of this message so far */
    struct z_stream_s *zs; /* inflater, allocated at the first compressed message */
    bool zs_dirty;         /* used since its last reset */
    /* control frame being read */
    uint8_t *ctl; /* 125 bytes while a control frame is split across reads */
    uint8_t ctl_len;
    bool failed;
};

/* EDGE_RX_TEXT only with params.text; its payload is valid UTF-8. */
enum edge_rx_kind { EDGE_RX_MESSAGE, EDGE_RX_TEXT, EDGE_RX_PING, EDGE_RX_PONG, EDGE_RX_CLOSE };

/* One complete message or control frame. `data` is borrowed for the call
 * and may be modified. Return 0 to go on, 1 to stop feeding (the caller
 * paused or closed the connection; edge_rx_feed returns what it consumed). */
typedef int (*edge_rx_cb)(void *user, enum edge_rx_kind kind, uint8_t *data, size_t len);

/* Why the stream cannot go on: the close code to send and a short reason. */
struct edge_rx_error {
    uint16_t code;
    const char *reason; /* static text */
};

void edge_rx_init(struct edge_rx *rx, const struct edge_rx_params *p, size_t limit);
/* Free what the receive side holds (message buffer, inflater). */
void edge_rx_free(struct edge_rx *rx);
/* Lower or raise the message limit (before AUTH it is small). A message
 * already being assembled is held to the new limit from its next byte. */
void edge_rx_set_limit(struct edge_rx *rx, size_t limit);
/* Release buffers an idle connection does not need (between messages). */
void edge_rx_trim(struct edge_rx *rx);

/* Feed `len` bytes (modified in place: unmasked). Returns the bytes
 * consumed (len unless a callback returned 1), or -1 with *err set; after
 * an error the receive side stays failed and consumes nothing more. */
long edge_rx_feed(struct edge_rx *rx, uint8_t *buf, size_t len, edge_rx_cb cb, void *user,
                  struct edge_rx_error *err);

/* Bytes this receive side holds for the connection (memory accounting). */
size_t edge_rx_held(const struct edge_rx *rx);

#endif
