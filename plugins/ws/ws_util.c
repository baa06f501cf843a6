/* Helpers shared by the edge and pipe sides of the transport. */
#include "ws_util.h"

#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <arpa/inet.h>

char *ws_strdup(const char *s)
{
    size_t n;
    char *d;

    if (!s)
        return NULL;
    n = strlen(s) + 1;
    d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

void ws_set_int_opt(int fd, int level, int name, int v)
{
    (void)setsockopt(fd, level, name, &v, sizeof(v));
}

void ws_peer_string(int fd, char *out, size_t outlen)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char ip[INET6_ADDRSTRLEN];

    out[0] = '\0';
    if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
        return;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;

        if (inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip)))
            snprintf(out, outlen, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;

        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            if (inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], ip, sizeof(ip)))
                snprintf(out, outlen, "%s:%u", ip, (unsigned)ntohs(s6->sin6_port));
        } else if (inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip))) {
            snprintf(out, outlen, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
        }
    }
}

/* Copy `len` bytes masked with `key` (bytes in wire order), 8 at a time. */
void ws_mask_copy(uint8_t *dst, const uint8_t *src, size_t len, const uint8_t key[4])
{
    uint64_t k8;
    uint8_t kb[8];
    size_t i = 0;

    memcpy(kb, key, 4);
    memcpy(kb + 4, key, 4);
    memcpy(&k8, kb, 8);
    for (; i + 8 <= len; i += 8) {
        uint64_t v;

        memcpy(&v, src + i, 8);
        v ^= k8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < len; i++)
        dst[i] = src[i] ^ key[i & 3];
}
