/* IP addresses and CIDR blocks for trusted proxies and per-source limits:
 * who is the real device behind HAProxy (X-Forwarded-For, honoured only when
 * the socket peer is a trusted proxy). IPv4 and IPv6; an IPv4-mapped IPv6
 * address (::ffff:a.b.c.d) is the IPv4 address. */
#ifndef EMX_NETADDR_H
#define EMX_NETADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Long enough for any address inet_ntop writes. */
#define EMX_ADDR_MAX 48

struct emx_ip {
    uint8_t family; /* 4 or 6 */
    uint8_t addr[16];
};

struct emx_cidr {
    struct emx_ip ip;
    uint8_t bits;
};

struct emx_cidr_list {
    size_t count;
    struct emx_cidr *items; /* owned */
};

/* "10.1.2.3", "::1", "[::1]" (no port). Returns 0 or -EINVAL. */
int emx_ip_parse(const char *text, size_t len, struct emx_ip *out);
/* Canonical text of an address (inet_ntop). */
void emx_ip_format(const struct emx_ip *ip, char *out, size_t cap);
/* "10.0.0.0/8", "fd00::/8", or one address (a /32 or /128). Host bits set
 * below the prefix are refused, so a typo does not silently widen a block. */
int emx_cidr_parse(const char *text, struct emx_cidr *out);
bool emx_cidr_has(const struct emx_cidr *c, const struct emx_ip *ip);
/* Parse every item; on error fills err with the bad item and returns
 * -EINVAL (or -ENOMEM) and leaves *out empty. */
int emx_cidr_list_parse(const char *const *items, size_t n, struct emx_cidr_list *out, char *err,
                        size_t errlen);
void emx_cidr_list_free(struct emx_cidr_list *l);
bool emx_cidr_list_has(const struct emx_cidr_list *l, const struct emx_ip *ip);

/* The address part of "ip:port" or "[v6]:port" (or a bare address). */
int emx_peer_ip(const char *peer, struct emx_ip *out);

/* The device's address: the socket peer, unless the peer is trusted and an
 * X-Forwarded-For header came; then the right-most address of the header
 * that is not itself trusted (the left-most when all are). An unparseable
 * entry ends the walk: the last good address before it is used. Writes the
 * canonical text to out; returns true when X-Forwarded-For was used. */
bool emx_real_address(const struct emx_cidr_list *trusted, const char *peer, const char *xff,
                      char *out, size_t cap);

#endif
