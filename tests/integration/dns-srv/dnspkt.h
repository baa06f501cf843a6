/* Hand-built DNS packets for the dns-srv tests: the parser's unit test and
 * the plugin test's DNS fixture write answers byte by byte with this, so a
 * test says exactly which bytes it sends (compression pointers included). */
#ifndef EMX_TEST_DNSPKT_H
#define EMX_TEST_DNSPKT_H

#include <arpa/inet.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PKT_MAX 65535

enum { PKT_AN = 1, PKT_NS = 2, PKT_AR = 3 };

struct pkt {
    uint8_t b[PKT_MAX];
    size_t len;
    uint16_t qd, an, ns, ar;
    bool overflow;
};

static inline void pkt_u8(struct pkt *p, unsigned v)
{
    if (p->len < sizeof(p->b))
        p->b[p->len++] = (uint8_t)v;
    else
        p->overflow = true;
}

static inline void pkt_u16(struct pkt *p, unsigned v)
{
    pkt_u8(p, (v >> 8) & 0xFF);
    pkt_u8(p, v & 0xFF);
}

static inline void pkt_u32(struct pkt *p, uint32_t v)
{
    pkt_u16(p, v >> 16);
    pkt_u16(p, v & 0xFFFF);
}

static inline void pkt_bytes(struct pkt *p, const void *d, size_t n)
{
    for (size_t i = 0; i < n; i++)
        pkt_u8(p, ((const uint8_t *)d)[i]);
}

/* The labels of a dotted name, without the terminating root label. */
static inline void pkt_labels(struct pkt *p, const char *dotted)
{
    const char *s = dotted;
    while (*s && strcmp(s, ".") != 0) {
        const char *dot = strchr(s, '.');
        size_t n = dot ? (size_t)(dot - s) : strlen(s);
        pkt_u8(p, (unsigned)n);
        pkt_bytes(p, s, n);
        s += n;
        if (*s == '.')
            s++;
    }
}

/* A whole name, uncompressed; returns where it starts (for pointers). */
static inline size_t pkt_name(struct pkt *p, const char *dotted)
{
    size_t at = p->len;
    pkt_labels(p, dotted);
    pkt_u8(p, 0);
    return at;
}

/* A compression pointer to offset `off`. */
static inline void pkt_ptr(struct pkt *p, size_t off)
{
    pkt_u16(p, 0xC000u | (unsigned)off);
}

/* Header with all counts 0 (pkt_finish writes them): a response (QR) with
 * `flags` ORed in (0x0200 TC, rcode in the low 4 bits). */
static inline void pkt_begin(struct pkt *p, uint16_t id, uint16_t flags)
{
    memset(p, 0, sizeof(*p));
    pkt_u16(p, id);
    pkt_u16(p, 0x8000u | 0x0100u | 0x0080u | flags); /* QR RD RA */
    for (int i = 0; i < 4; i++)
        pkt_u16(p, 0);
}

/* The question; returns where its name starts (12). */
static inline size_t pkt_question(struct pkt *p, const char *qname, uint16_t qtype)
{
    size_t at = pkt_name(p, qname);
    pkt_u16(p, qtype);
    pkt_u16(p, 1);
    p->qd++;
    return at;
}

static inline void pkt_count(struct pkt *p, int section)
{
    if (section == PKT_AN)
        p->an++;
    else if (section == PKT_NS)
        p->ns++;
    else
        p->ar++;
}

/* Type, class IN, TTL and a placeholder rdlength after an owner the caller
 * wrote; returns where rdata starts, for pkt_rr_end. */
static inline size_t pkt_rr_fixed(struct pkt *p, int section, uint16_t type, uint32_t ttl)
{
    pkt_u16(p, type);
    pkt_u16(p, 1);
    pkt_u32(p, ttl);
    pkt_u16(p, 0);
    pkt_count(p, section);
    return p->len;
}

static inline void pkt_rr_end(struct pkt *p, size_t rdata_at)
{
    size_t n = p->len - rdata_at;
    if (rdata_at < 2 || p->overflow)
        return;
    p->b[rdata_at - 2] = (uint8_t)(n >> 8);
    p->b[rdata_at - 1] = (uint8_t)n;
}

/* Records with uncompressed names. */
static inline void pkt_srv(struct pkt *p, int section, const char *owner, uint32_t ttl,
                           uint16_t prio, uint16_t weight, uint16_t port, const char *target)
{
    pkt_name(p, owner);
    size_t rd = pkt_rr_fixed(p, section, 33, ttl);
    pkt_u16(p, prio);
    pkt_u16(p, weight);
    pkt_u16(p, port);
    pkt_name(p, target);
    pkt_rr_end(p, rd);
}

static inline void pkt_addr(struct pkt *p, int section, const char *owner, uint32_t ttl,
                            const char *text)
{
    uint8_t buf[16];
    bool v6 = strchr(text, ':') != NULL;
    if (inet_pton(v6 ? AF_INET6 : AF_INET, text, buf) != 1) {
        p->overflow = true;
        return;
    }
    pkt_name(p, owner);
    size_t rd = pkt_rr_fixed(p, section, v6 ? 28 : 1, ttl);
    pkt_bytes(p, buf, v6 ? 16 : 4);
    pkt_rr_end(p, rd);
}

static inline void pkt_cname(struct pkt *p, int section, const char *owner, uint32_t ttl,
                             const char *target)
{
    pkt_name(p, owner);
    size_t rd = pkt_rr_fixed(p, section, 5, ttl);
    pkt_name(p, target);
    pkt_rr_end(p, rd);
}

static inline void pkt_soa(struct pkt *p, const char *zone, uint32_t ttl, uint32_t minimum)
{
    pkt_name(p, zone);
    size_t rd = pkt_rr_fixed(p, PKT_NS, 6, ttl);
    pkt_labels(p, "ns");
    pkt_name(p, zone);
    pkt_labels(p, "admin");
    pkt_name(p, zone);
    pkt_u32(p, 1);
    pkt_u32(p, 60);
    pkt_u32(p, 60);
    pkt_u32(p, 600);
    pkt_u32(p, minimum);
    pkt_rr_end(p, rd);
}

/* Writes the section counts into the header. */
static inline void pkt_finish(struct pkt *p)
{
    const uint16_t c[4] = {p->qd, p->an, p->ns, p->ar};
    for (int i = 0; i < 4; i++) {
        p->b[4 + 2 * i] = (uint8_t)(c[i] >> 8);
        p->b[5 + 2 * i] = (uint8_t)c[i];
    }
}

#endif
