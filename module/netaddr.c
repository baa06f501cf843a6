#include "netaddr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

#define XFF_MAX_HOPS 32 /* more proxies than this is not a real chain */

static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

int emx_ip_parse(const char *text, size_t len, struct emx_ip *out)
{
    char buf[INET6_ADDRSTRLEN + 2];
    if (!text)
        return -EINVAL;
    if (len >= 2 && text[0] == '[' && text[len - 1] == ']') {
        text++;
        len -= 2;
    }
    if (len == 0 || len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, text, len);
    buf[len] = '\0';
    memset(out, 0, sizeof(*out));
    if (inet_pton(AF_INET, buf, out->addr) == 1) {
        out->family = 4;
        return 0;
    }
    uint8_t a6[16];
    if (inet_pton(AF_INET6, buf, a6) != 1)
        return -EINVAL;
    if (memcmp(a6, v4mapped, sizeof(v4mapped)) == 0) {
        out->family = 4;
        memcpy(out->addr, a6 + 12, 4);
    } else {
        out->family = 6;
        memcpy(out->addr, a6, 16);
    }
    return 0;
}

void emx_ip_format(const struct emx_ip *ip, char *out, size_t cap)
{
    char buf[INET6_ADDRSTRLEN];
    if (!inet_ntop(ip->family == 4 ? AF_INET : AF_INET6, ip->addr, buf, sizeof(buf)))
        buf[0] = '\0';
    snprintf(out, cap, "%s", buf);
}

static bool prefix_equal(const uint8_t *a, const uint8_t *b, unsigned bits)
{
    unsigned whole = bits / 8, rest = bits % 8;
    if (memcmp(a, b, whole) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xFF << (8 - rest));
    return (a[whole] & mask) == (b[whole] & mask);
}

int emx_cidr_parse(const char *text, struct emx_cidr *out)
{
    if (!text)
        return -EINVAL;
    const char *slash = strchr(text, '/');
    size_t alen = slash ? (size_t)(slash - text) : strlen(text);
    struct emx_cidr c;
    if (emx_ip_parse(text, alen, &c.ip) != 0)
        return -EINVAL;
    /* ::ffff:10.0.0.0/104 is written in IPv6 bits but names 10.0.0.0/8 */
    bool v6_text = memchr(text, ':', alen) != NULL;
    unsigned max = c.ip.family == 4 ? 32 : 128;
    unsigned text_max = v6_text ? 128 : max;
    unsigned bits = max;
    if (slash) {
        char *end;
        if (slash[1] < '0' || slash[1] > '9')
            return -EINVAL;
        unsigned long v = strtoul(slash + 1, &end, 10);
        if (*end || v > text_max)
            return -EINVAL;
        bits = (unsigned)v;
        if (c.ip.family == 4 && v6_text) {
            if (bits < 96)
                return -EINVAL;
            bits -= 96;
        }
    }
    c.bits = (uint8_t)bits;
    /* host bits must be zero: only the prefix may be set */
    uint8_t masked[16];
    memcpy(masked, c.ip.addr, 16);
    for (unsigned i = bits; i < max; i++)
        masked[i / 8] &= (uint8_t) ~(0x80 >> (i % 8));
    if (memcmp(masked, c.ip.addr, 16) != 0)
        return -EINVAL;
    *out = c;
    return 0;
}

bool emx_cidr_has(const struct emx_cidr *c, const struct emx_ip *ip)
{
    return c->ip.family == ip->family && prefix_equal(c->ip.addr, ip->addr, c->bits);
}

int emx_cidr_list_parse(const char *const *items, size_t n, struct emx_cidr_list *out, char *err,
                        size_t errlen)
{
    out->count = 0;
    out->items = NULL;
    if (n == 0)
        return 0;
    struct emx_cidr *v = emx_calloc(n, sizeof(*v));
    if (!v)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (emx_cidr_parse(items[i], &v[i]) != 0) {
            if (err && errlen)
                snprintf(err, errlen, "'%.60s' is not an IP address or CIDR block", items[i]);
            emx_free(v);
            return -EINVAL;
        }
    }
    out->count = n;
    out->items = v;
    return 0;
}

void emx_cidr_list_free(struct emx_cidr_list *l)
{
    emx_free_ptr(&l->items);
    l->count = 0;
}

bool emx_cidr_list_has(const struct emx_cidr_list *l, const struct emx_ip *ip)
{
    for (size_t i = 0; l && i < l->count; i++)
        if (emx_cidr_has(&l->items[i], ip))
            return true;
    return false;
}

int emx_peer_ip(const char *peer, struct emx_ip *out)
{
    if (!peer)
        return -EINVAL;
    size_t len = strlen(peer);
    if (peer[0] == '[') {
        const char *end = strchr(peer, ']');
        if (!end)
            return -EINVAL;
        return emx_ip_parse(peer, (size_t)(end - peer) + 1, out);
    }
    const char *colon = strchr(peer, ':');
    if (colon && !strchr(colon + 1, ':')) /* one colon: IPv4 with a port */
        len = (size_t)(colon - peer);
    return emx_ip_parse(peer, len, out);
}

/* One X-Forwarded-For entry: trimmed, maybe "[v6]" or "[v6]:port" or
 * "v4:port" (some proxies add ports). */
static int xff_entry(const char *s, size_t len, struct emx_ip *out)
{
    while (len && (*s == ' ' || *s == '\t'))
        s++, len--;
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    char buf[INET6_ADDRSTRLEN + 10];
    if (len == 0 || len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, s, len);
    buf[len] = '\0';
    return emx_peer_ip(buf, out);
}

bool emx_real_address(const struct emx_cidr_list *trusted, const char *peer, const char *xff,
                      char *out, size_t cap)
{
    struct emx_ip ip;
    if (emx_peer_ip(peer, &ip) != 0) {
        snprintf(out, cap, "%s", peer ? peer : "?");
        return false;
    }
    emx_ip_format(&ip, out, cap);
    if (!xff || !*xff || !emx_cidr_list_has(trusted, &ip))
        return false;
    bool used = false;
    const char *end = xff + strlen(xff);
    for (int hops = 0; end > xff && hops < XFF_MAX_HOPS; hops++) {
        const char *start = end;
        while (start > xff && start[-1] != ',')
            start--;
        struct emx_ip hop;
        if (xff_entry(start, (size_t)(end - start), &hop) != 0)
            break;
        emx_ip_format(&hop, out, cap);
        used = true;
        if (!emx_cidr_list_has(trusted, &hop))
            break;
        end = start > xff ? start - 1 : xff;
    }
    return used;
}
