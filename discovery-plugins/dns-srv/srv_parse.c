/* Raw DNS answers for the dns-srv plugin: see srv_parse.h. */
#include "srv_parse.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define HEADER_LEN 12
#define RR_FIXED   10 /* type, class, ttl, rdlength */
#define NAME_WIRE  255
#define HOPS_MAX   64 /* compression pointers followed in one name */
#define FLAG_QR    0x8000u
#define FLAG_TC    0x0200u

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
                                                      ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -EBADMSG;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static bool plain_char(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '*';
}

/* Reads the name at *pos. Labels written in place must end before `limit`
 * (the end of the rdata holding them, or of the packet); a compression
 * pointer must point below every byte of the name read so far, so a name
 * always ends. On return *pos is just past the name where it was written. */
static int read_name(const uint8_t *p, size_t len, size_t *pos, size_t limit, char *out,
                     const char *what, char *err, size_t errlen)
{
    size_t at = *pos, lowest = *pos, end = 0, wire = 0, o = 0;
    size_t bound = limit;
    int hops = 0;
    bool jumped = false;

    for (;;) {
        if (at >= bound)
            return fail(err, errlen, "offset %zu: %s runs past the end of its %s", at, what,
                        jumped || bound == len ? "packet" : "record");
        uint8_t c = p[at];
        if ((c & 0xC0) == 0xC0) {
            if (at + 1 >= bound)
                return fail(err, errlen, "offset %zu: %s: compression pointer cut short", at, what);
            size_t target = ((size_t)(c & 0x3F) << 8) | p[at + 1];
            if (target >= lowest)
                return fail(err, errlen,
                            "offset %zu: %s: compression pointer to %zu does not point back "
                            "(a loop or a forward reference)",
                            at, what, target);
            if (++hops > HOPS_MAX)
                return fail(err, errlen, "offset %zu: %s: too many compression pointers", at, what);
            if (!jumped)
                end = at + 2;
            jumped = true;
            lowest = target;
            at = target;
            bound = len;
            continue;
        }
        if (c & 0xC0)
            return fail(err, errlen, "offset %zu: %s: label type 0x%02x is not supported", at, what,
                        c & 0xC0);
        if (c == 0) {
            at++;
            break;
        }
        if (c > bound - at - 1)
            return fail(err, errlen, "offset %zu: %s: label of %u bytes runs past the end", at,
                        what, c);
        wire += 1u + c;
        if (wire + 1 > NAME_WIRE)
            return fail(err, errlen, "offset %zu: %s is longer than 255 bytes", at, what);
        if (o)
            out[o++] = '.';
        for (size_t i = 0; i < c; i++) {
            uint8_t b = p[at + 1 + i];
            if (b >= 'A' && b <= 'Z')
                b = (uint8_t)(b - 'A' + 'a');
            if (plain_char(b)) {
                out[o++] = (char)b;
            } else {
                snprintf(out + o, 5, "\\%03u", b);
                o += 4;
            }
        }
        at += 1u + c;
    }
    out[o] = '\0';
    *pos = jumped ? end : at;
    return 0;
}

static char *dup_text(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

void dns_msg_free(struct dns_msg *msg)
{
    if (!msg)
        return;
    for (size_t i = 0; i < msg->count; i++) {
        struct dns_rr *rr = &msg->rrs[i];
        free(rr->owner);
        if (rr->type == DNS_T_SRV)
            free(rr->u.srv.target);
        else if (rr->type == DNS_T_CNAME)
            free(rr->u.cname);
    }
    free(msg->rrs);
    free(msg->qname);
    memset(msg, 0, sizeof(*msg));
}

static const char *section_name(int s)
{
    return s == DNS_SEC_ANSWER ? "answer" : s == DNS_SEC_AUTHORITY ? "authority" : "additional";
}

/* Reads one record at *pos into rr (when kept: *keep true). */
static int read_rr(const uint8_t *p, size_t len, size_t *pos, int section, size_t index,
                   struct dns_rr *rr, bool *keep, char *name, char *err, size_t errlen)
{
    char what[64];
    snprintf(what, sizeof(what), "%s record %zu", section_name(section), index + 1);

    *keep = false;
    int rc = read_name(p, len, pos, len, name, what, err, errlen);
    if (rc)
        return rc;
    size_t at = *pos;
    if (len - at < RR_FIXED)
        return fail(err, errlen, "offset %zu: %s: cut short in its fixed fields", at, what);
    uint16_t type = get16(p + at), klass = get16(p + at + 2);
    uint32_t ttl = get32(p + at + 4);
    size_t rdlen = get16(p + at + 8);
    at += RR_FIXED;
    if (rdlen > len - at)
        return fail(err, errlen, "offset %zu: %s: rdata of %zu bytes runs past the end (%zu left)",
                    at, what, rdlen, len - at);
    size_t rdend = at + rdlen;
    *pos = rdend;

    if (klass != DNS_C_IN || (type != DNS_T_SRV && type != DNS_T_A && type != DNS_T_AAAA &&
                              type != DNS_T_CNAME && type != DNS_T_SOA))
        return 0;

    memset(rr, 0, sizeof(*rr));
    rr->section = (uint8_t)section;
    rr->type = type;
    rr->ttl = ttl & 0x80000000u ? 0 : ttl;
    char target[DNS_NAME_TEXT_MAX];
    switch (type) {
    case DNS_T_A:
    case DNS_T_AAAA: {
        size_t want = type == DNS_T_A ? 4 : 16;
        if (rdlen != want)
            return fail(err, errlen, "offset %zu: %s: %s rdata of %zu bytes (expected %zu)", at,
                        what, type == DNS_T_A ? "A" : "AAAA", rdlen, want);
        rr->u.addr.family = type == DNS_T_A ? AF_INET : AF_INET6;
        memcpy(rr->u.addr.bytes, p + at, want);
        break;
    }
    case DNS_T_SRV: {
        if (rdlen < 7)
            return fail(err, errlen, "offset %zu: %s: SRV rdata of %zu bytes is too short", at,
                        what, rdlen);
        rr->u.srv.priority = get16(p + at);
        rr->u.srv.weight = get16(p + at + 2);
        rr->u.srv.port = get16(p + at + 4);
        size_t t = at + 6;
        if ((rc = read_name(p, len, &t, rdend, target, what, err, errlen)))
            return rc;
        if (t != rdend)
            return fail(err, errlen, "offset %zu: %s: SRV target ends %zu bytes before its rdata",
                        t, what, rdend - t);
        break;
    }
    case DNS_T_CNAME: {
        size_t t = at;
        if ((rc = read_name(p, len, &t, rdend, target, what, err, errlen)))
            return rc;
        if (t != rdend)
            return fail(err, errlen, "offset %zu: %s: CNAME ends %zu bytes before its rdata", t,
                        what, rdend - t);
        break;
    }
    case DNS_T_SOA: {
        size_t t = at;
        if ((rc = read_name(p, len, &t, rdend, target, what, err, errlen)) ||
            (rc = read_name(p, len, &t, rdend, target, what, err, errlen)))
            return rc;
        if (rdend - t != 20)
            return fail(err, errlen, "offset %zu: %s: SOA has %zu bytes after its names (not 20)",
                        t, what, rdend - t);
        rr->u.soa.minimum = get32(p + t + 16);
        if (rr->u.soa.minimum & 0x80000000u)
            rr->u.soa.minimum = 0;
        break;
    }
    }
    if (!(rr->owner = dup_text(name)))
        return -ENOMEM;
    if (type == DNS_T_SRV && !(rr->u.srv.target = dup_text(target))) {
        free(rr->owner);
        return -ENOMEM;
    }
    if (type == DNS_T_CNAME && !(rr->u.cname = dup_text(target))) {
        free(rr->owner);
        return -ENOMEM;
    }
    *keep = true;
    return 0;
}

int dns_parse(const uint8_t *buf, size_t len, struct dns_msg *msg, char *err, size_t errlen)
{
    struct dns_msg m;
    char name[DNS_NAME_TEXT_MAX];
    int rc;

    memset(&m, 0, sizeof(m));
    memset(msg, 0, sizeof(*msg));
    if (!buf || len < HEADER_LEN)
        return fail(err, errlen, "%zu bytes: shorter than a DNS header", buf ? len : 0);
    m.id = get16(buf);
    m.flags = get16(buf + 2);
    m.rcode = m.flags & 0xF;
    m.truncated = (m.flags & FLAG_TC) != 0;
    size_t qd = get16(buf + 4), an = get16(buf + 6), ns = get16(buf + 8), ar = get16(buf + 10);
    if (!(m.flags & FLAG_QR))
        return fail(err, errlen, "offset 2: not a response (QR is 0)");
    if (((m.flags >> 11) & 0xF) != 0)
        return fail(err, errlen, "offset 2: opcode %u is not QUERY", (m.flags >> 11) & 0xF);
    if (qd != 1)
        return fail(err, errlen, "offset 4: %zu questions (expected 1)", qd);

    size_t pos = HEADER_LEN;
    if ((rc = read_name(buf, len, &pos, len, name, "question", err, errlen)))
        return rc;
    if (len - pos < 4)
        return fail(err, errlen, "offset %zu: question cut short in its type and class", pos);
    m.qtype = get16(buf + pos);
    m.qclass = get16(buf + pos + 2);
    pos += 4;

    /* A record takes at least 11 bytes: counts the packet cannot hold are
     * refused before anything is allocated for them. */
    size_t total = an + ns + ar;
    if (total > (len - pos) / 11)
        return fail(err, errlen,
                    "offset 6: counts announce %zu records, but the %zu bytes left hold at most "
                    "%zu",
                    total, len - pos, (len - pos) / 11);
    if (!(m.qname = dup_text(name)))
        return -ENOMEM;
    if (total && !(m.rrs = calloc(total, sizeof(*m.rrs)))) {
        rc = -ENOMEM;
        goto fail;
    }
    const size_t counts[3] = {an, ns, ar};
    const int sections[3] = {DNS_SEC_ANSWER, DNS_SEC_AUTHORITY, DNS_SEC_ADDITIONAL};
    for (int s = 0; s < 3; s++) {
        for (size_t i = 0; i < counts[s]; i++) {
            bool keep;
            rc = read_rr(buf, len, &pos, sections[s], i, &m.rrs[m.count], &keep, name, err, errlen);
            if (rc)
                goto fail;
            m.count += keep;
        }
    }
    if (pos != len) {
        rc = fail(err, errlen, "offset %zu: %zu bytes after the last record the counts announce",
                  pos, len - pos);
        goto fail;
    }
    *msg = m;
    return 0;
fail:
    dns_msg_free(&m);
    return rc;
}

int dns_name_normalize(const char *name, char *out, size_t outlen)
{
    size_t n = name ? strlen(name) : 0;
    if (n && name[n - 1] == '.' && !(n >= 2 && name[n - 2] == '\\'))
        n--;
    if (n == 0 || n >= outlen || n > NAME_WIRE - 2)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (!plain_char((uint8_t)c) && c != '.')
            return -EINVAL;
        if (c == '.' && (i == 0 || name[i - 1] == '.'))
            return -EINVAL; /* an empty label */
        out[i] = c;
    }
    out[n] = '\0';
    return 0;
}

const char *dns_chase(const struct dns_msg *msg, const char *name, uint32_t *ttl)
{
    const char *cur = name;
    for (int hop = 0; hop <= DNS_CHAIN_MAX; hop++) {
        const struct dns_rr *next = NULL;
        for (size_t i = 0; i < msg->count && !next; i++) {
            const struct dns_rr *rr = &msg->rrs[i];
            if (rr->section == DNS_SEC_ANSWER && rr->type == DNS_T_CNAME &&
                strcmp(rr->owner, cur) == 0)
                next = rr;
        }
        if (!next)
            return cur;
        if (next->ttl < *ttl)
            *ttl = next->ttl;
        cur = next->u.cname;
    }
    return NULL;
}

bool dns_negative_ttl(const struct dns_msg *msg, uint32_t *ttl)
{
    for (size_t i = 0; i < msg->count; i++) {
        const struct dns_rr *rr = &msg->rrs[i];
        if (rr->section == DNS_SEC_AUTHORITY && rr->type == DNS_T_SOA) {
            *ttl = rr->ttl < rr->u.soa.minimum ? rr->ttl : rr->u.soa.minimum;
            return true;
        }
    }
    return false;
}

static const char *rcode_name(int rcode)
{
    static const char *const names[] = {"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN",
                                        "NOTIMP",  "REFUSED", "YXDOMAIN", "YXRRSET",
                                        "NXRRSET", "NOTAUTH", "NOTZONE"};
    return rcode >= 0 && rcode < (int)(sizeof(names) / sizeof(names[0])) ? names[rcode]
                                                                         : "an unknown rcode";
}

/* The checks both questions share: parsed, the question asked, complete, an
 * rcode that is an answer. */
static int read_answer(const uint8_t *buf, size_t len, const char *qname, uint16_t qtype,
                       struct dns_msg *m, char *want, char *err, size_t errlen)
{
    int rc = dns_parse(buf, len, m, err, errlen);
    if (rc)
        return rc;
    if (dns_name_normalize(qname, want, DNS_NAME_TEXT_MAX) != 0) {
        rc = fail(err, errlen, "'%s' is not a valid name to ask for", qname);
        goto fail;
    }
    if (m->qtype != qtype || m->qclass != DNS_C_IN || strcmp(m->qname, want) != 0) {
        rc = fail(err, errlen, "the answer is for another question (%s type %u class %u)", m->qname,
                  m->qtype, m->qclass);
        goto fail;
    }
    if (m->truncated) {
        rc = fail(err, errlen, "the answer is truncated (TC) even over TCP");
        goto fail;
    }
    if (m->rcode != DNS_RCODE_NOERROR && m->rcode != DNS_RCODE_NXDOMAIN) {
        if (err && errlen)
            snprintf(err, errlen, "%s", rcode_name(m->rcode));
        rc = -EPROTO;
        goto fail;
    }
    return 0;
fail:
    dns_msg_free(m);
    return rc;
}

void srv_answer_free(struct srv_answer *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->count; i++) {
        free(a->targets[i].name);
        free(a->targets[i].addrs);
    }
    free(a->targets);
    memset(a, 0, sizeof(*a));
}

/* The addresses of `name` among the message's records of `sections`
 * (following CNAMEs of the answer section first); *ttl lowered to theirs. */
static int collect_addrs(const struct dns_msg *m, const char *name, int sections, int type_mask,
                         struct srv_addr **out, size_t *nout, uint32_t *ttl)
{
    size_t n = 0;
    for (size_t i = 0; i < m->count; i++) {
        const struct dns_rr *rr = &m->rrs[i];
        if ((rr->section & sections) && (rr->type == DNS_T_A || rr->type == DNS_T_AAAA) &&
            ((rr->type == DNS_T_A ? 1 : 2) & type_mask) && strcmp(rr->owner, name) == 0)
            n++;
    }
    *out = NULL;
    *nout = 0;
    if (!n)
        return 0;
    struct srv_addr *a = calloc(n, sizeof(*a));
    if (!a)
        return -ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < m->count; i++) {
        const struct dns_rr *rr = &m->rrs[i];
        if ((rr->section & sections) && (rr->type == DNS_T_A || rr->type == DNS_T_AAAA) &&
            ((rr->type == DNS_T_A ? 1 : 2) & type_mask) && strcmp(rr->owner, name) == 0) {
            a[k].family = rr->u.addr.family;
            memcpy(a[k].bytes, rr->u.addr.bytes, sizeof(a[k].bytes));
            a[k].ttl = rr->ttl;
            if (rr->ttl < *ttl)
                *ttl = rr->ttl;
            k++;
        }
    }
    *out = a;
    *nout = n;
    return 0;
}

int srv_answer_parse(const uint8_t *buf, size_t len, const char *qname, struct srv_answer *out,
                     char *err, size_t errlen)
{
    struct dns_msg m;
    struct srv_answer a;
    char want[DNS_NAME_TEXT_MAX];
    int rc;

    memset(out, 0, sizeof(*out));
    memset(&a, 0, sizeof(a));
    if ((rc = read_answer(buf, len, qname, DNS_T_SRV, &m, want, err, errlen)))
        return rc;

    uint32_t ttl = UINT32_MAX;
    const char *owner = dns_chase(&m, want, &ttl);
    if (!owner) {
        rc = fail(err, errlen, "CNAME chain from %s is a loop or longer than %d", want,
                  DNS_CHAIN_MAX);
        goto fail;
    }
    size_t n = 0;
    for (size_t i = 0; i < m.count; i++)
        n += m.rrs[i].section == DNS_SEC_ANSWER && m.rrs[i].type == DNS_T_SRV &&
             strcmp(m.rrs[i].owner, owner) == 0;
    if (n == 0) {
        a.outcome = m.rcode == DNS_RCODE_NXDOMAIN ? SRV_NXDOMAIN : SRV_NODATA;
        a.ttl_known = dns_negative_ttl(&m, &a.ttl);
        dns_msg_free(&m);
        *out = a;
        return 0;
    }
    if (m.rcode == DNS_RCODE_NXDOMAIN) {
        rc = fail(err, errlen, "NXDOMAIN with SRV records in the answer");
        goto fail;
    }
    if (!(a.targets = calloc(n, sizeof(*a.targets)))) {
        rc = -ENOMEM;
        goto fail;
    }
    a.outcome = SRV_RECORDS;
    for (size_t i = 0; i < m.count; i++) {
        const struct dns_rr *rr = &m.rrs[i];
        if (rr->section != DNS_SEC_ANSWER || rr->type != DNS_T_SRV || strcmp(rr->owner, owner))
            continue;
        struct srv_target *t = &a.targets[a.count++];
        t->priority = rr->u.srv.priority;
        t->weight = rr->u.srv.weight;
        t->port = rr->u.srv.port;
        t->ttl = rr->ttl;
        if (rr->ttl < ttl)
            ttl = rr->ttl;
        if (!(t->name = dup_text(rr->u.srv.target))) {
            rc = -ENOMEM;
            goto fail;
        }
        if (!t->name[0])
            continue;
        /* Additional records may reach the target through a CNAME of the
         * additional section too; follow one level at most. */
        const char *host = t->name;
        for (size_t j = 0; j < m.count; j++) {
            const struct dns_rr *c = &m.rrs[j];
            if (c->type == DNS_T_CNAME && strcmp(c->owner, host) == 0) {
                host = c->u.cname;
                break;
            }
        }
        uint32_t attl = UINT32_MAX;
        if ((rc = collect_addrs(&m, host, DNS_SEC_ANSWER | DNS_SEC_ADDITIONAL, 3, &t->addrs,
                                &t->naddrs, &attl)))
            goto fail;
        if (t->naddrs && attl < ttl)
            ttl = attl;
    }
    a.ttl = ttl;
    a.ttl_known = true;
    dns_msg_free(&m);
    *out = a;
    return 0;
fail:
    srv_answer_free(&a);
    dns_msg_free(&m);
    return rc;
}

int srv_addr_answer_parse(const uint8_t *buf, size_t len, const char *qname, uint16_t qtype,
                          struct srv_addr **addrs, size_t *naddrs, uint32_t *ttl, bool *ttl_known,
                          char *err, size_t errlen)
{
    struct dns_msg m;
    char want[DNS_NAME_TEXT_MAX];
    int rc;

    *addrs = NULL;
    *naddrs = 0;
    *ttl_known = false;
    if (qtype != DNS_T_A && qtype != DNS_T_AAAA)
        return -EINVAL;
    if ((rc = read_answer(buf, len, qname, qtype, &m, want, err, errlen)))
        return rc;
    uint32_t t = UINT32_MAX;
    const char *owner = dns_chase(&m, want, &t);
    if (!owner) {
        dns_msg_free(&m);
        return fail(err, errlen, "CNAME chain from %s is a loop or longer than %d", want,
                    DNS_CHAIN_MAX);
    }
    rc = collect_addrs(&m, owner, DNS_SEC_ANSWER, qtype == DNS_T_A ? 1 : 2, addrs, naddrs, &t);
    if (rc == 0 && *naddrs == 0) {
        uint32_t neg;
        if (dns_negative_ttl(&m, &neg)) {
            *ttl = neg < t ? neg : t;
            *ttl_known = true;
        } else if (t != UINT32_MAX) {
            *ttl = t;
            *ttl_known = true;
        }
    } else if (rc == 0) {
        *ttl = t;
        *ttl_known = true;
    }
    dns_msg_free(&m);
    return rc;
}

int srv_pick_addr(const struct srv_addr *addrs, size_t n, enum srv_family family, char *out,
                  size_t outlen)
{
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; pass++) {
        int want;
        if (family == SRV_FAMILY_IPV4)
            want = pass ? 0 : AF_INET;
        else if (family == SRV_FAMILY_IPV6)
            want = pass ? 0 : AF_INET6;
        else
            want = pass ? AF_INET6 : AF_INET;
        if (!want)
            break;
        size_t blen = want == AF_INET ? 4 : 16;
        for (size_t i = 0; i < n; i++) {
            if (addrs[i].family != want)
                continue;
            if (best < 0 || memcmp(addrs[i].bytes, addrs[best].bytes, blen) < 0)
                best = (int)i;
        }
    }
    if (best < 0)
        return -1;
    if (!inet_ntop(addrs[best].family, addrs[best].bytes, out, (socklen_t)outlen))
        return -1;
    return best;
}

uint64_t srv_refresh_ms(uint32_t ttl_s, uint64_t min_ms, uint64_t max_ms)
{
    uint64_t ms = (uint64_t)ttl_s * 1000u;
    if (ms < min_ms)
        ms = min_ms;
    if (ms > max_ms)
        ms = max_ms;
    return ms;
}
