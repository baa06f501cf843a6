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
