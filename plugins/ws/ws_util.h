/* Small helpers both sides of the transport use: edges (edge*.c) and
 * pipes (pipe*.c, ws.c). */
#ifndef EMX_WS_UTIL_H
#define EMX_WS_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

static inline void *ws_zalloc(size_t n)
{
    return calloc(1, n);
}

/* Whole seconds, rounded up, at most 65535 (lws and socket options). */
static inline unsigned secs_of(uint64_t ms)
{
    uint64_t s = (ms + 999) / 1000;

    return s > 65535 ? 65535 : (unsigned)s;
}

char *ws_strdup(const char *s);
/* Best effort: a failure only weakens dead-peer detection or latency. */
void ws_set_int_opt(int fd, int level, int name, int v);
/* "ip:port" ("[ip6]:port") of a socket's peer; "" when unknown. IPv4 peers
 * of a dual-stack listener are shown as IPv4. */
void ws_peer_string(int fd, char *out, size_t outlen);
/* Copy `len` bytes masked with `key` (RFC 6455 §5.3; bytes in wire
 * order), 8 at a time: client frames (raw pipes, tunnel back ends). */
void ws_mask_copy(uint8_t *dst, const uint8_t *src, size_t len, const uint8_t key[4]);

#endif
