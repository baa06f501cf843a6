/* The dns-srv plugin's DNS answer reader: raw DNS messages as c-ares hands
 * them over (header, question, answer, authority and additional sections,
 * name compression), read with every length checked, and the two questions
 * the plugin asks of them: "which SRV records does this name have, with which
 * TTLs and which addresses from the additional section" and "which addresses
 * does this host name have". c-ares 1.18's own ares_parse_srv_reply gives no
 * TTL and skips the additional section, hence this file.
 *
 * Pure functions, no I/O, no globals: unit-tested with hand-built packets
 * and fuzzed (tests/fuzz/fuzz_srv_parse.c).
 */
#ifndef EMX_DNS_SRV_PARSE_H
#define EMX_DNS_SRV_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DNS_T_A     1
#define DNS_T_CNAME 5
#define DNS_T_SOA   6
#define DNS_T_AAAA  28
#define DNS_T_SRV   33
#define DNS_C_IN    1

#define DNS_RCODE_NOERROR  0
#define DNS_RCODE_FORMERR  1
#define DNS_RCODE_SERVFAIL 2
#define DNS_RCODE_NXDOMAIN 3
#define DNS_RCODE_NOTIMP   4
#define DNS_RCODE_REFUSED  5

/* A name in presentation form: lower case, no trailing dot, "" for the root;
 * bytes other than letters, digits, '-', '_' and '*' are written \DDD. The
 * longest wire name (255 bytes) fits. */
#define DNS_NAME_TEXT_MAX 1100

/* CNAMEs followed from a question's name before giving up. */
#define DNS_CHAIN_MAX 8

enum dns_section {
    DNS_SEC_ANSWER = 1,
    DNS_SEC_AUTHORITY = 2,
    DNS_SEC_ADDITIONAL = 4,
};

/* One resource record the reader keeps: class IN, of the types above. Other
 * records are checked for length and skipped. */
struct dns_rr {
    uint8_t section; /* enum dns_section */
    uint16_t type;
    uint32_t ttl; /* seconds; a TTL with the top bit set reads as 0 (RFC 2181) */
    char *owner;  /* owned by the message */
    union {
        struct {
            uint16_t priority, weight, port;
            char *target; /* owned by the message; "" is "." (no service) */
        } srv;
        struct {
            int family;        /* AF_INET (A) or AF_INET6 (AAAA) */
            uint8_t bytes[16]; /* network order; 4 bytes for A */
        } addr;
        char *cname; /* owned by the message */
        struct {
            uint32_t minimum; /* the SOA's negative-caching TTL field */
        } soa;
    } u;
};

struct dns_msg {
    uint16_t id;
    uint16_t flags;
    int rcode;
    bool truncated; /* TC */
    char *qname;    /* owned by the message */
    uint16_t qtype, qclass;
    struct dns_rr *rrs;
    size_t count;
};

/* Reads a whole DNS response. Returns 0 and fills *msg (free it with
 * dns_msg_free), -EBADMSG with one line in err (offset and what is wrong)
 * for anything malformed — a length past the end, a count the packet does
 * not hold, bytes after the last record, a compression pointer that does not
 * point strictly backwards (so no loop), a name over 255 bytes, rdata whose
 * length disagrees with its type, no question or more than one, not a
 * response — or -ENOMEM. On failure *msg is cleared. */
int dns_parse(const uint8_t *buf, size_t len, struct dns_msg *msg, char *err, size_t errlen);
void dns_msg_free(struct dns_msg *msg);

/* Lower-cases `name` and drops one trailing dot into out (at least
 * DNS_NAME_TEXT_MAX bytes), so it compares with names the reader wrote.
 * Returns 0, or -EINVAL for an empty, too long or badly escaped name. */
int dns_name_normalize(const char *name, char *out, size_t outlen);

/* Follows CNAMEs of the answer section from `name` (at most DNS_CHAIN_MAX);
 * returns the final owner name (borrowed from msg or `name` itself) and
 * lowers *ttl to the smallest CNAME TTL followed. NULL on a loop or a chain
 * too long. */
const char *dns_chase(const struct dns_msg *msg, const char *name, uint32_t *ttl);

/* The negative-caching TTL of an empty answer: min(SOA TTL, SOA minimum) of
 * the first SOA in the authority section (RFC 2308). false when there is none. */
bool dns_negative_ttl(const struct dns_msg *msg, uint32_t *ttl);

/* ---- what the plugin asks ---- */

struct srv_addr {
    int family;        /* AF_INET or AF_INET6 */
    uint8_t bytes[16]; /* network order */
    uint32_t ttl;
};

struct srv_target {
    char *name; /* owned; the SRV target, "" for "." */
    uint16_t priority, weight, port;
    uint32_t ttl;           /* of the SRV record */
    struct srv_addr *addrs; /* owned; A/AAAA from the additional section */
    size_t naddrs;
};

enum srv_outcome {
    SRV_RECORDS = 1, /* one or more SRV records (some may have target ".") */
    SRV_NXDOMAIN,    /* the name does not exist: an empty set */
    SRV_NODATA,      /* the name exists but has no SRV record: an empty set */
};

struct srv_answer {
    enum srv_outcome outcome;
    struct srv_target *targets; /* owned; in the order of the answer */
    size_t count;
    /* Smallest TTL of the SRV records, the CNAMEs followed to them and the
     * additional addresses used; for an empty answer the SOA's negative TTL.
     * ttl_known is false for an empty answer without an SOA. */
    uint32_t ttl;
    bool ttl_known;
};

/* Reads the answer to "qname SRV?". Beyond dns_parse's checks, the question
 * must be qname, SRV, IN; the answer must not be truncated; the rcode must be
 * NOERROR or NXDOMAIN (anything else is -EPROTO with the rcode in err).
 * Returns 0, -EBADMSG, -EPROTO or -ENOMEM; on failure *out is cleared. */
int srv_answer_parse(const uint8_t *buf, size_t len, const char *qname, struct srv_answer *out,
                     char *err, size_t errlen);
void srv_answer_free(struct srv_answer *a);

/* Reads the answer to "qname A?" or "qname AAAA?" (qtype), following CNAMEs.
 * NXDOMAIN and NODATA are answers with no address. *ttl is the smallest TTL
 * of the addresses and CNAMEs, or the negative TTL (*ttl_known false when
 * there is neither). Returns 0 (*addrs owned by the caller, free()), or
 * -EBADMSG, -EPROTO, -ENOMEM as srv_answer_parse. */
int srv_addr_answer_parse(const uint8_t *buf, size_t len, const char *qname, uint16_t qtype,
                          struct srv_addr **addrs, size_t *naddrs, uint32_t *ttl, bool *ttl_known,
                          char *err, size_t errlen);

/* Which address family an instance is reached over. */
enum srv_family {
    SRV_FAMILY_ANY = 0, /* IPv4 if the target has one, else IPv6 */
    SRV_FAMILY_IPV4,
    SRV_FAMILY_IPV6,
};

/* The address an instance is reached at, among a target's addresses: of the
 * wanted family (for ANY, IPv4 first), the numerically smallest, so servers
 * that rotate their answers do not move instances. Writes it in text to out
 * (at least 46 bytes) and returns its index, or -1 when none fits. */
int srv_pick_addr(const struct srv_addr *addrs, size_t n, enum srv_family family, char *out,
                  size_t outlen);

/* When to ask again after an answer with TTL `ttl_s` seconds: the TTL in
 * milliseconds clamped to [min_ms, max_ms]; TTL 0 gives min_ms. */
uint64_t srv_refresh_ms(uint32_t ttl_s, uint64_t min_ms, uint64_t max_ms);

#endif
