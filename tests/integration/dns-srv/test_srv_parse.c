/* The dns-srv plugin's raw DNS answer reader on its own, with hand-built
 * packets: TTLs, additional A/AAAA, compression pointers (and loops), every
 * truncation of a packet, wrong counts, weight 0, two priorities, empty
 * answers, CNAMEs, address picking and the TTL clamp. */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "dnspkt.h"
#include "srv_parse.h"

#define QNAME "_tw._tcp.example.test"

static struct pkt P;

static void begin_srv(uint16_t flags)
{
    pkt_begin(&P, 0x1234, flags);
    pkt_question(&P, QNAME, DNS_T_SRV);
}

static struct srv_answer parse_ok(void)
{
    struct srv_answer a;
    char err[256] = "";
    pkt_finish(&P);
    assert_false(P.overflow);
    int rc = srv_answer_parse(P.b, P.len, QNAME ".", &a, err, sizeof(err));
    if (rc)
        fprintf(stderr, "unexpected error %d: %s\n", rc, err);
    assert_int_equal(rc, 0);
    return a;
}

/* Parsing fails with rc and an error containing `part`. */
static void parse_fails(const uint8_t *buf, size_t len, int want_rc, const char *part)
{
    struct srv_answer a;
    char err[256] = "";
    int rc = srv_answer_parse(buf, len, QNAME, &a, err, sizeof(err));
    if (rc != want_rc || (part && !strstr(err, part)))
        fprintf(stderr, "rc %d, error '%s' (wanted %d with '%s')\n", rc, err, want_rc,
                part ? part : "");
    assert_int_equal(rc, want_rc);
    if (part)
        assert_non_null(strstr(err, part));
    assert_null(a.targets);
    assert_int_equal(a.count, 0);
}

static void addr_is(const struct srv_addr *a, const char *text, uint32_t ttl)
{
    char buf[INET6_ADDRSTRLEN];
    assert_non_null(inet_ntop(a->family, a->bytes, buf, sizeof(buf)));
    assert_string_equal(buf, text);
    assert_int_equal(a->ttl, ttl);
}

/* Two SRV records with their addresses in the additional section: every
 * field, and the answer's TTL is the smallest of records and addresses. */
static void test_ttls_and_additional(void **state)
{
    (void)state;
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 30, 0, 10, 8443, "p1.example.test");
    pkt_srv(&P, PKT_AN, QNAME, 20, 0, 5, 8444, "p2.example.test");
    pkt_addr(&P, PKT_AR, "p1.example.test", 12, "10.0.0.1");
    pkt_addr(&P, PKT_AR, "p2.example.test", 40, "fd00::2");
    pkt_addr(&P, PKT_AR, "p2.example.test", 41, "10.0.0.2");
    struct srv_answer a = parse_ok();
    assert_int_equal(a.outcome, SRV_RECORDS);
    assert_int_equal(a.count, 2);
    assert_string_equal(a.targets[0].name, "p1.example.test");
    assert_int_equal(a.targets[0].priority, 0);
    assert_int_equal(a.targets[0].weight, 10);
    assert_int_equal(a.targets[0].port, 8443);
    assert_int_equal(a.targets[0].ttl, 30);
    assert_int_equal(a.targets[0].naddrs, 1);
    addr_is(&a.targets[0].addrs[0], "10.0.0.1", 12);
    assert_string_equal(a.targets[1].name, "p2.example.test");
    assert_int_equal(a.targets[1].weight, 5);
    assert_int_equal(a.targets[1].ttl, 20);
    assert_int_equal(a.targets[1].naddrs, 2);
    addr_is(&a.targets[1].addrs[0], "fd00::2", 40);
    addr_is(&a.targets[1].addrs[1], "10.0.0.2", 41);
    assert_true(a.ttl_known);
    assert_int_equal(a.ttl, 12);
    srv_answer_free(&a);
}

/* Without additional records the targets come back without addresses and
 * the TTL is the SRV records' own. */
static void test_no_additional(void **state)
{
    (void)state;
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 300, 1, 1, 9000, "p1.example.test");
    struct srv_answer a = parse_ok();
    assert_int_equal(a.count, 1);
    assert_int_equal(a.targets[0].naddrs, 0);
    assert_null(a.targets[0].addrs);
    assert_int_equal(a.ttl, 300);
    srv_answer_free(&a);
}

/* The packet a server writes with compression: owners point at the
 * question, targets share the zone's suffix, additional owners point into
 * the SRV rdata. Read the same as without compression. */
static size_t build_compressed(void)
{
    pkt_begin(&P, 7, 0);
    size_t q = pkt_question(&P, QNAME, DNS_T_SRV);
    size_t zone = q + 4 + 5; /* "example.test" inside the question */
    pkt_ptr(&P, q);
    size_t rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 60);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0); /* weight 0 */
    pkt_u16(&P, 8443);
    size_t t1 = P.len;
    pkt_labels(&P, "p1");
    pkt_ptr(&P, zone);
    pkt_rr_end(&P, rd);
    pkt_ptr(&P, q);
    rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 60);
    pkt_u16(&P, 1); /* a second priority */
    pkt_u16(&P, 100);
    pkt_u16(&P, 8443);
    size_t t2 = P.len;
    pkt_labels(&P, "p2");
    pkt_ptr(&P, zone);
    pkt_rr_end(&P, rd);
    pkt_ptr(&P, t1);
    rd = pkt_rr_fixed(&P, PKT_AR, DNS_T_A, 60);
    pkt_bytes(&P, "\x0a\x00\x00\x01", 4);
    pkt_rr_end(&P, rd);
    pkt_ptr(&P, t2);
    rd = pkt_rr_fixed(&P, PKT_AR, DNS_T_AAAA, 60);
    pkt_bytes(&P, "\xfd\x00\0\0\0\0\0\0\0\0\0\0\0\0\0\x02", 16);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    return P.len;
}

static void test_compression(void **state)
{
    (void)state;
    build_compressed();
    struct srv_answer a = parse_ok();
    assert_int_equal(a.count, 2);
    assert_string_equal(a.targets[0].name, "p1.example.test");
    assert_string_equal(a.targets[1].name, "p2.example.test");
    assert_int_equal(a.targets[0].naddrs, 1);
    addr_is(&a.targets[0].addrs[0], "10.0.0.1", 60);
    assert_int_equal(a.targets[1].naddrs, 1);
    addr_is(&a.targets[1].addrs[0], "fd00::2", 60);
    /* weight 0 is kept as 0; both priorities are kept */
    assert_int_equal(a.targets[0].weight, 0);
    assert_int_equal(a.targets[0].priority, 0);
    assert_int_equal(a.targets[1].weight, 100);
    assert_int_equal(a.targets[1].priority, 1);
    srv_answer_free(&a);
}

/* Every strict prefix of a valid packet is refused: no crash, no partial set. */
static void test_truncated_at_every_length(void **state)
{
    (void)state;
    size_t full = build_compressed();
    uint8_t copy[PKT_MAX];
    memcpy(copy, P.b, full);
    for (size_t n = 0; n < full; n++) {
        /* Each prefix in a buffer of its own size, so ASan sees any overread. */
        uint8_t *b = malloc(n ? n : 1);
        assert_non_null(b);
        memcpy(b, copy, n);
        struct srv_answer a;
        char err[256];
        int rc = srv_answer_parse(b, n, QNAME, &a, err, sizeof(err));
        if (rc != -EBADMSG)
            fprintf(stderr, "prefix of %zu bytes: rc %d\n", n, rc);
        assert_int_equal(rc, -EBADMSG);
        assert_true(err[0] != '\0');
        free(b);
    }
    /* the same for a packet without compression and with an SOA */
    pkt_begin(&P, 8, DNS_RCODE_NXDOMAIN);
    pkt_question(&P, QNAME, DNS_T_SRV);
    pkt_soa(&P, "example.test", 60, 5);
    pkt_finish(&P);
    full = P.len;
    memcpy(copy, P.b, full);
    for (size_t n = 0; n < full; n++) {
        struct srv_answer a;
        assert_int_equal(srv_answer_parse(copy, n, QNAME, &a, NULL, 0), -EBADMSG);
    }
}

static void test_pointer_loops(void **state)
{
    (void)state;
    /* the answer's owner is a pointer to itself */
    begin_srv(0);
    size_t self = P.len;
    pkt_ptr(&P, self);
    size_t rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_u8(&P, 0);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "does not point back");

    /* a label followed by a pointer back to that label: a loop through
     * an earlier offset */
    begin_srv(0);
    size_t lab = P.len;
    pkt_labels(&P, "a");
    pkt_ptr(&P, lab);
    rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_u8(&P, 0);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "does not point back");

    /* a pointer forward (to the target name that follows) */
    begin_srv(0);
    pkt_ptr(&P, P.len + 2 + 10 + 6);
    rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_name(&P, "p1.example.test");
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "does not point back");

    /* two pointers pointing at each other inside the SRV target */
    begin_srv(0);
    pkt_name(&P, QNAME);
    rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    size_t first = P.len;
    pkt_ptr(&P, first + 2);
    pkt_ptr(&P, first);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "does not point back");

    /* a pointer cut short at the end of its rdata */
    begin_srv(0);
    pkt_name(&P, QNAME);
    rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_u8(&P, 0xC0);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "cut short");
}

static void test_wrong_counts(void **state)
{
    (void)state;
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 30, 0, 10, 8443, "p1.example.test");
    pkt_addr(&P, PKT_AR, "p1.example.test", 30, "10.0.0.1");
    pkt_finish(&P);
    uint8_t b[PKT_MAX];
    size_t n = P.len;

    /* one more answer record than the packet holds */
    memcpy(b, P.b, n);
    b[7] = 2;
    parse_fails(b, n, -EBADMSG, NULL);
    /* one fewer: bytes left after the last record */
    memcpy(b, P.b, n);
    b[7] = 0;
    parse_fails(b, n, -EBADMSG, "after the last record");
    /* counts far beyond what the bytes can hold: refused before reading */
    memcpy(b, P.b, n);
    b[10] = 0xFF;
    b[11] = 0xFF;
    parse_fails(b, n, -EBADMSG, "counts announce");
    /* no question, two questions */
    memcpy(b, P.b, n);
    b[5] = 0;
    parse_fails(b, n, -EBADMSG, "questions");
    memcpy(b, P.b, n);
    b[5] = 2;
    parse_fails(b, n, -EBADMSG, "questions");
    /* not a response */
    memcpy(b, P.b, n);
    b[2] &= 0x7F;
    parse_fails(b, n, -EBADMSG, "not a response");
    /* SRV rdlength one byte longer than its target */
    begin_srv(0);
    pkt_name(&P, QNAME);
    size_t rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_name(&P, "p1.example.test");
    pkt_u8(&P, 0);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "SRV target ends");
    /* an A record of 5 bytes, an AAAA of 4 */
    begin_srv(0);
    pkt_name(&P, "p1.example.test");
    rd = pkt_rr_fixed(&P, PKT_AR, DNS_T_A, 1);
    pkt_bytes(&P, "\1\2\3\4\5", 5);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "expected 4");
    begin_srv(0);
    pkt_name(&P, "p1.example.test");
    rd = pkt_rr_fixed(&P, PKT_AR, DNS_T_AAAA, 1);
    pkt_bytes(&P, "\1\2\3\4", 4);
    pkt_rr_end(&P, rd);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "expected 16");
    /* an rdlength past the end of the packet */
    begin_srv(0);
    pkt_name(&P, QNAME);
    rd = pkt_rr_fixed(&P, PKT_AN, 16 /* TXT */, 1);
    pkt_u8(&P, 1);
    pkt_rr_end(&P, rd);
    P.b[rd - 1] = 9;
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "runs past the end");
}

static void test_name_limits(void **state)
{
    (void)state;
    char long_name[400] = "";
    /* 5 labels of 63 bytes: 320 bytes on the wire */
    for (int i = 0; i < 5; i++) {
        size_t at = strlen(long_name);
        memset(long_name + at, 'a' + i, 63);
        long_name[at + 63] = '.';
        long_name[at + 64] = '\0';
    }
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 1, 0, 0, 1, long_name);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "longer than 255");

    /* label types 01 and 10 */
    begin_srv(0);
    pkt_u8(&P, 0x41);
    pkt_bytes(&P, "\0\0\0\0\0\0\0\0\0\0\0\0", 12);
    P.an = 1;
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "label type");

    /* odd bytes are kept, escaped: "a.b" as one label */
    begin_srv(0);
    pkt_name(&P, QNAME);
    size_t rd = pkt_rr_fixed(&P, PKT_AN, DNS_T_SRV, 1);
    pkt_u16(&P, 0);
    pkt_u16(&P, 0);
    pkt_u16(&P, 1);
    pkt_u8(&P, 3);
    pkt_bytes(&P, "A.b", 3);
    pkt_name(&P, "Example.TEST");
    pkt_rr_end(&P, rd);
    struct srv_answer a = parse_ok();
    assert_string_equal(a.targets[0].name, "a\\046b.example.test");
    srv_answer_free(&a);
}

static void test_empty_answers(void **state)
{
    (void)state;
    /* NXDOMAIN with an SOA: negative TTL min(SOA ttl, minimum) */
    begin_srv(DNS_RCODE_NXDOMAIN);
    pkt_soa(&P, "example.test", 60, 5);
    struct srv_answer a = parse_ok();
    assert_int_equal(a.outcome, SRV_NXDOMAIN);
    assert_int_equal(a.count, 0);
    assert_true(a.ttl_known);
    assert_int_equal(a.ttl, 5);
    srv_answer_free(&a);

    /* NODATA: NOERROR, a TXT record of the name but no SRV */
    begin_srv(0);
    pkt_name(&P, QNAME);
    size_t rd = pkt_rr_fixed(&P, PKT_AN, 16, 1);
    pkt_u8(&P, 1);
    pkt_u8(&P, 'x');
    pkt_rr_end(&P, rd);
    pkt_soa(&P, "example.test", 3, 600);
    a = parse_ok();
    assert_int_equal(a.outcome, SRV_NODATA);
    assert_int_equal(a.ttl, 3);
    srv_answer_free(&a);

    /* NODATA without an SOA: no TTL */
    begin_srv(0);
    a = parse_ok();
    assert_int_equal(a.outcome, SRV_NODATA);
    assert_false(a.ttl_known);
    srv_answer_free(&a);

    /* target ".": a record, but no service */
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 9, 0, 0, 0, ".");
    a = parse_ok();
    assert_int_equal(a.outcome, SRV_RECORDS);
    assert_int_equal(a.count, 1);
    assert_string_equal(a.targets[0].name, "");
    srv_answer_free(&a);
}

static void test_rcodes_and_questions(void **state)
{
    (void)state;
    begin_srv(DNS_RCODE_SERVFAIL);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EPROTO, "SERVFAIL");
    begin_srv(DNS_RCODE_REFUSED);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EPROTO, "REFUSED");
    /* truncated even over TCP */
    begin_srv(0x0200);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "truncated");
    /* another name, another type */
    pkt_begin(&P, 1, 0);
    pkt_question(&P, "_other._tcp.example.test", DNS_T_SRV);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "another question");
    pkt_begin(&P, 1, 0);
    pkt_question(&P, QNAME, DNS_T_A);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "another question");
    /* the question's case does not matter */
    pkt_begin(&P, 1, 0);
    pkt_question(&P, "_TW._Tcp.EXAMPLE.test", DNS_T_SRV);
    pkt_srv(&P, PKT_AN, "_tw._tcp.Example.Test", 5, 0, 1, 2, "P1.example.test");
    struct srv_answer a = parse_ok();
    assert_int_equal(a.count, 1);
    assert_string_equal(a.targets[0].name, "p1.example.test");
    srv_answer_free(&a);
    /* NXDOMAIN that still carries SRV records is contradictory */
    begin_srv(DNS_RCODE_NXDOMAIN);
    pkt_srv(&P, PKT_AN, QNAME, 5, 0, 1, 2, "p1.example.test");
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "NXDOMAIN");
}

static void test_ttl_and_cname(void **state)
{
    (void)state;
    /* a TTL with the top bit set reads as 0 (RFC 2181) */
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 0x80000005u, 0, 1, 2, "p1.example.test");
    struct srv_answer a = parse_ok();
    assert_int_equal(a.targets[0].ttl, 0);
    assert_int_equal(a.ttl, 0);
    srv_answer_free(&a);

    /* the name is a CNAME to the records; the CNAME's TTL counts */
    begin_srv(0);
    pkt_cname(&P, PKT_AN, QNAME, 4, "_real._tcp.example.test");
    pkt_srv(&P, PKT_AN, "_real._tcp.example.test", 50, 0, 1, 2, "p1.example.test");
    pkt_srv(&P, PKT_AN, "_unrelated._tcp.example.test", 1, 0, 1, 2, "px.example.test");
    a = parse_ok();
    assert_int_equal(a.count, 1);
    assert_string_equal(a.targets[0].name, "p1.example.test");
    assert_int_equal(a.ttl, 4);
    srv_answer_free(&a);

    /* a CNAME loop */
    begin_srv(0);
    pkt_cname(&P, PKT_AN, QNAME, 4, "a.example.test");
    pkt_cname(&P, PKT_AN, "a.example.test", 4, QNAME);
    pkt_finish(&P);
    parse_fails(P.b, P.len, -EBADMSG, "CNAME");
}

static void test_addr_answers(void **state)
{
    (void)state;
    struct srv_addr *addrs;
    size_t n;
    uint32_t ttl;
    bool known;
    char err[256];

    pkt_begin(&P, 3, 0);
    pkt_question(&P, "p1.example.test", DNS_T_A);
    pkt_cname(&P, PKT_AN, "p1.example.test", 9, "host.example.test");
    pkt_addr(&P, PKT_AN, "host.example.test", 20, "192.0.2.7");
    pkt_addr(&P, PKT_AN, "host.example.test", 20, "192.0.2.5");
    pkt_addr(&P, PKT_AN, "other.example.test", 1, "192.0.2.9");
    pkt_finish(&P);
    assert_int_equal(srv_addr_answer_parse(P.b, P.len, "p1.example.test.", DNS_T_A, &addrs, &n,
                                           &ttl, &known, err, sizeof(err)),
                     0);
    assert_int_equal(n, 2);
    assert_true(known);
    assert_int_equal(ttl, 9);
    char text[64];
    assert_int_equal(srv_pick_addr(addrs, n, SRV_FAMILY_ANY, text, sizeof(text)), 1);
    assert_string_equal(text, "192.0.2.5");
    free(addrs);

    /* NODATA for AAAA: no address, the SOA's TTL */
    pkt_begin(&P, 3, 0);
    pkt_question(&P, "p1.example.test", DNS_T_AAAA);
    pkt_soa(&P, "example.test", 30, 2);
    pkt_finish(&P);
    assert_int_equal(srv_addr_answer_parse(P.b, P.len, "p1.example.test", DNS_T_AAAA, &addrs, &n,
                                           &ttl, &known, err, sizeof(err)),
                     0);
    assert_int_equal(n, 0);
    assert_null(addrs);
    assert_true(known);
    assert_int_equal(ttl, 2);

    /* the question must be the one asked */
    assert_int_equal(srv_addr_answer_parse(P.b, P.len, "p1.example.test", DNS_T_A, &addrs, &n, &ttl,
                                           &known, err, sizeof(err)),
                     -EBADMSG);
    /* SERVFAIL */
    pkt_begin(&P, 3, DNS_RCODE_SERVFAIL);
    pkt_question(&P, "p1.example.test", DNS_T_A);
    pkt_finish(&P);
    assert_int_equal(srv_addr_answer_parse(P.b, P.len, "p1.example.test", DNS_T_A, &addrs, &n, &ttl,
                                           &known, err, sizeof(err)),
                     -EPROTO);
    assert_string_equal(err, "SERVFAIL");
}

static void test_pick_addr(void **state)
{
    (void)state;
    struct srv_addr a[4];
    memset(a, 0, sizeof(a));
    a[0].family = AF_INET6;
    inet_pton(AF_INET6, "fd00::9", a[0].bytes);
    a[1].family = AF_INET;
    inet_pton(AF_INET, "10.0.0.9", a[1].bytes);
    a[2].family = AF_INET;
    inet_pton(AF_INET, "10.0.0.3", a[2].bytes);
    a[3].family = AF_INET6;
    inet_pton(AF_INET6, "fd00::1", a[3].bytes);
    char t[INET6_ADDRSTRLEN];
    assert_int_equal(srv_pick_addr(a, 4, SRV_FAMILY_ANY, t, sizeof(t)), 2);
    assert_string_equal(t, "10.0.0.3");
    assert_int_equal(srv_pick_addr(a, 4, SRV_FAMILY_IPV6, t, sizeof(t)), 3);
    assert_string_equal(t, "fd00::1");
    assert_int_equal(srv_pick_addr(a, 4, SRV_FAMILY_IPV4, t, sizeof(t)), 2);
    /* an IPv6-only target */
    assert_int_equal(srv_pick_addr(a, 1, SRV_FAMILY_ANY, t, sizeof(t)), 0);
    assert_string_equal(t, "fd00::9");
    assert_int_equal(srv_pick_addr(a, 1, SRV_FAMILY_IPV4, t, sizeof(t)), -1);
    assert_int_equal(srv_pick_addr(NULL, 0, SRV_FAMILY_ANY, t, sizeof(t)), -1);
}

static void test_ttl_clamp(void **state)
{
    (void)state;
    assert_int_equal(srv_refresh_ms(0, 1000, 300000), 1000);
    assert_int_equal(srv_refresh_ms(1, 1000, 300000), 1000);
    assert_int_equal(srv_refresh_ms(30, 1000, 300000), 30000);
    assert_int_equal(srv_refresh_ms(300, 1000, 300000), 300000);
    assert_int_equal(srv_refresh_ms(86400, 1000, 300000), 300000);
    assert_int_equal(srv_refresh_ms(UINT32_MAX, 1000, 300000), 300000);
    assert_int_equal(srv_refresh_ms(0, 250, 250), 250);
}

static void test_normalize(void **state)
{
    (void)state;
    char out[DNS_NAME_TEXT_MAX];
    assert_int_equal(dns_name_normalize("_TW._tcp.Example.COM.", out, sizeof(out)), 0);
    assert_string_equal(out, "_tw._tcp.example.com");
    assert_int_equal(dns_name_normalize("a", out, sizeof(out)), 0);
    assert_string_equal(out, "a");
    assert_int_equal(dns_name_normalize("", out, sizeof(out)), -EINVAL);
    assert_int_equal(dns_name_normalize(".", out, sizeof(out)), -EINVAL);
    assert_int_equal(dns_name_normalize("a..b", out, sizeof(out)), -EINVAL);
    assert_int_equal(dns_name_normalize("a b", out, sizeof(out)), -EINVAL);
    assert_int_equal(dns_name_normalize("a\\.b", out, sizeof(out)), -EINVAL);
    assert_int_equal(dns_name_normalize(NULL, out, sizeof(out)), -EINVAL);
}

/* Unknown types are skipped whatever their class (OPT in the additional
 * section, TXT, a CHAOS A); NULL or tiny error buffers are safe. */
static void test_skipped_records(void **state)
{
    (void)state;
    begin_srv(0);
    pkt_srv(&P, PKT_AN, QNAME, 7, 0, 1, 80, "p1.example.test");
    pkt_u8(&P, 0); /* OPT: root owner, type 41, class = payload size */
    pkt_u16(&P, 41);
    pkt_u16(&P, 1232);
    pkt_u32(&P, 0);
    pkt_u16(&P, 0);
    P.ar++;
    pkt_name(&P, "p1.example.test");
    pkt_u16(&P, DNS_T_A);
    pkt_u16(&P, 3); /* CHAOS */
    pkt_u32(&P, 1);
    pkt_u16(&P, 4);
    pkt_bytes(&P, "\1\1\1\1", 4);
    P.ar++;
    struct srv_answer a = parse_ok();
    assert_int_equal(a.count, 1);
    assert_int_equal(a.targets[0].naddrs, 0);
    assert_int_equal(a.ttl, 7);
    srv_answer_free(&a);

    uint8_t junk[3] = {1, 2, 3};
    char tiny[4];
    assert_int_equal(srv_answer_parse(junk, 3, QNAME, &a, NULL, 0), -EBADMSG);
    assert_int_equal(srv_answer_parse(junk, 3, QNAME, &a, tiny, sizeof(tiny)), -EBADMSG);
    assert_int_equal(strlen(tiny), 3);
    assert_int_equal(srv_answer_parse(NULL, 0, QNAME, &a, NULL, 0), -EBADMSG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ttls_and_additional),
        cmocka_unit_test(test_no_additional),
        cmocka_unit_test(test_compression),
        cmocka_unit_test(test_truncated_at_every_length),
        cmocka_unit_test(test_pointer_loops),
        cmocka_unit_test(test_wrong_counts),
        cmocka_unit_test(test_name_limits),
        cmocka_unit_test(test_empty_answers),
        cmocka_unit_test(test_rcodes_and_questions),
        cmocka_unit_test(test_ttl_and_cname),
        cmocka_unit_test(test_addr_answers),
        cmocka_unit_test(test_pick_addr),
        cmocka_unit_test(test_ttl_clamp),
        cmocka_unit_test(test_normalize),
        cmocka_unit_test(test_skipped_records),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
