/* Fuzz the dns-srv plugin's raw DNS answer reader: any bytes give either a
 * message whose every field holds the documented invariants, or -EBADMSG /
 * -EPROTO with a one-line reason. The question is taken from the packet
 * itself, so the SRV and address readers get past the question check. Built
 * with discovery-plugins/dns-srv/srv_parse.c (see
 * tests/integration/dns-srv/CMakeLists.txt). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "srv_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_name(const char *s)
{
    size_t n = strlen(s);
    if (n >= DNS_NAME_TEXT_MAX || (n && (s[0] == '.' || s[n - 1] == '.')))
        abort();
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e ||
            (s[i] >= 'A' && s[i] <= 'Z'))
            abort(); /* not lower-case printable presentation form */
}

static void check_err(int rc, const char *err)
{
    if (rc == 0 || rc == -ENOMEM)
        return;
    if ((rc != -EBADMSG && rc != -EPROTO) || !err[0] || strchr(err, '\n'))
        abort(); /* an unknown error, or one without a one-line reason */
}

static void check_addrs(const struct srv_addr *a, size_t n)
{
    char text[64];
    for (size_t i = 0; i < n; i++)
        if (a[i].family != AF_INET && a[i].family != AF_INET6)
            abort();
    for (int f = SRV_FAMILY_ANY; f <= SRV_FAMILY_IPV6; f++) {
        int k = srv_pick_addr(a, n, (enum srv_family)f, text, sizeof(text));
        if (k >= (int)n || (k < 0 && f == SRV_FAMILY_ANY && n > 0))
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct dns_msg m;
    char err[256] = "";
    char qname[DNS_NAME_TEXT_MAX] = "example.test";

    int rc = dns_parse(data, size, &m, err, sizeof(err));
    check_err(rc, err);
    if (rc == 0) {
        check_name(m.qname);
        for (size_t i = 0; i < m.count; i++) {
            check_name(m.rrs[i].owner);
            if (m.rrs[i].type == DNS_T_SRV)
                check_name(m.rrs[i].u.srv.target);
            if (m.rrs[i].ttl & 0x80000000u)
                abort();
        }
        if (m.qname[0] && strlen(m.qname) < sizeof(qname))
            memcpy(qname, m.qname, strlen(m.qname) + 1);
        dns_msg_free(&m);
    }

    struct srv_answer a;
    err[0] = '\0';
    rc = srv_answer_parse(data, size, qname, &a, err, sizeof(err));
    check_err(rc, err);
    if (rc == 0) {
        if (a.outcome != SRV_RECORDS && a.count)
            abort();
        if (a.outcome == SRV_RECORDS && (!a.count || !a.ttl_known))
            abort();
        for (size_t i = 0; i < a.count; i++) {
            check_name(a.targets[i].name);
            check_addrs(a.targets[i].addrs, a.targets[i].naddrs);
            if (a.targets[i].ttl < a.ttl)
                abort(); /* the answer's TTL is the smallest */
        }
        srv_answer_free(&a);
    } else if (a.count || a.targets) {
        abort();
    }

    static const uint16_t types[2] = {DNS_T_A, DNS_T_AAAA};
    for (int t = 0; t < 2; t++) {
        struct srv_addr *addrs;
        size_t n;
        uint32_t ttl;
        bool known;
        err[0] = '\0';
        rc = srv_addr_answer_parse(data, size, qname, types[t], &addrs, &n, &ttl, &known, err,
                                   sizeof(err));
        check_err(rc, err);
        if (rc == 0) {
            check_addrs(addrs, n);
            for (size_t i = 0; i < n; i++)
                if (addrs[i].family != (types[t] == DNS_T_A ? AF_INET : AF_INET6))
                    abort();
            free(addrs);
        } else if (addrs || n) {
            abort();
        }
    }
    return 0;
}
