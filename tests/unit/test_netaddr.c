/* Trusted proxies: CIDR matching and X-Forwarded-For resolution. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "netaddr.h"

static bool in(const char *cidr, const char *ip)
{
    struct emx_cidr c;
    struct emx_ip a;
    assert_int_equal(emx_cidr_parse(cidr, &c), 0);
    assert_int_equal(emx_ip_parse(ip, strlen(ip), &a), 0);
    return emx_cidr_has(&c, &a);
}

static void cidr_matching(void **state)
{
    (void)state;
    assert_true(in("10.0.0.0/8", "10.255.1.2"));
    assert_false(in("10.0.0.0/8", "11.0.0.1"));
    assert_true(in("192.168.1.0/25", "192.168.1.127"));
    assert_false(in("192.168.1.0/25", "192.168.1.128"));
    assert_true(in("127.0.0.1", "127.0.0.1"));
    assert_false(in("127.0.0.1", "127.0.0.2"));
    assert_true(in("0.0.0.0/0", "8.8.8.8"));
    assert_true(in("fd00::/8", "fd12:3456::1"));
    assert_false(in("fd00::/8", "fe80::1"));
    assert_true(in("::1", "::1"));
    assert_true(in("2001:db8::/33", "2001:db8:7fff::1"));
    assert_false(in("2001:db8::/33", "2001:db8:8000::1"));
    /* IPv4-mapped addresses are IPv4 */
    assert_true(in("10.0.0.0/8", "::ffff:10.1.2.3"));
    assert_true(in("::ffff:10.0.0.0/104", "10.9.9.9"));
    assert_false(in("10.0.0.0/8", "fd00::1"));
}

static void cidr_refusals(void **state)
{
    (void)state;
    struct emx_cidr c;
    const char *bad[] = {"",          "10.0.0.0/33",  "10.0.0.1/8",       "fd00::/129",
                         "10.0.0.0/", "10.0.0.0/x",   "10.0.0.0/-1",      "host.example",
                         "1.2.3",     "10.0.0.0/8/8", "::ffff:10.0.0.0/8"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_not_equal(emx_cidr_parse(bad[i], &c), 0);
    struct emx_cidr_list l;
    const char *items[] = {"10.0.0.0/8", "nope"};
    char err[128];
    assert_int_not_equal(emx_cidr_list_parse(items, 2, &l, err, sizeof(err)), 0);
    assert_non_null(strstr(err, "nope"));
    assert_int_equal(l.count, 0);
}

static void real_address(void **state)
{
    (void)state;
    const char *items[] = {"127.0.0.1", "10.0.0.0/8"};
    struct emx_cidr_list t;
    assert_int_equal(emx_cidr_list_parse(items, 2, &t, NULL, 0), 0);
    char out[EMX_ADDR_MAX];
    /* untrusted peer: the header is ignored */
    assert_false(emx_real_address(&t, "192.0.2.1:5000", "203.0.113.7", out, sizeof(out)));
    assert_string_equal(out, "192.0.2.1");
    /* trusted peer: right-most address not itself trusted */
    assert_true(emx_real_address(&t, "127.0.0.1:5000", "198.51.100.1, 203.0.113.7, 10.1.1.1", out,
                                 sizeof(out)));
    assert_string_equal(out, "203.0.113.7");
    /* all trusted: the left-most */
    assert_true(emx_real_address(&t, "127.0.0.1:1", "10.0.0.2,10.0.0.3", out, sizeof(out)));
    assert_string_equal(out, "10.0.0.2");
    /* garbage ends the walk at the last good hop */
    assert_true(
        emx_real_address(&t, "127.0.0.1:1", "203.0.113.9, bogus, 10.0.0.4", out, sizeof(out)));
    assert_string_equal(out, "10.0.0.4");
    assert_false(emx_real_address(&t, "127.0.0.1:1", "bogus", out, sizeof(out)));
    assert_string_equal(out, "127.0.0.1");
    /* ports and brackets in entries, IPv6 peers, canonical output */
    assert_true(emx_real_address(&t, "127.0.0.1:1", "[2001:DB8::0001]:443", out, sizeof(out)));
    assert_string_equal(out, "2001:db8::1");
    assert_true(emx_real_address(&t, "127.0.0.1:1", " 203.0.113.5:8080 ", out, sizeof(out)));
    assert_string_equal(out, "203.0.113.5");
    assert_false(emx_real_address(&t, "[::1]:80", "203.0.113.5", out, sizeof(out)));
    assert_string_equal(out, "::1");
    assert_false(emx_real_address(&t, NULL, "203.0.113.5", out, sizeof(out)));
    /* no list: never trusted */
    assert_false(emx_real_address(NULL, "127.0.0.1:1", "203.0.113.5", out, sizeof(out)));
    emx_cidr_list_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(cidr_matching),
        cmocka_unit_test(cidr_refusals),
        cmocka_unit_test(real_address),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
