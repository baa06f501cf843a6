/* The zookeeper plugin's Curator ServiceInstance parser and set builder on
 * their own: records as ThingWorx writes them, sslPort against port, ids,
 * payloads, and every class of bad record. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "zk_instance.h"

/* What a ThingWorx platform registers (Curator's JsonInstanceSerializer). */
static const char twx[] =
    "{\"name\":\"thingworx-https\",\"id\":\"b1d7c2e0-5a43-4f7e-9a51-0c2d3e4f5a6b\","
    "\"address\":\"10.0.0.11\",\"port\":8080,\"sslPort\":8443,\"payload\":null,"
    "\"registrationTimeUTC\":1700000000000,\"serviceType\":\"DYNAMIC\",\"uriSpec\":null}";

static struct zk_instance parse_ok(const char *node, const char *json, bool tls)
{
    struct zk_instance in;
    char err[512] = "";
    int rc = zk_instance_parse(node, json, strlen(json), tls, &in, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "  %s\n", err);
    assert_int_equal(rc, 0);
    return in;
}

/* Parsing fails with an error that contains `needle` and names the node. */
static void expect_error(const char *json, bool tls, const char *needle)
{
    struct zk_instance in;
    char err[512] = "";
    int rc = zk_instance_parse("n-1", json, json ? strlen(json) : 0, tls, &in, err, sizeof(err));
    if (rc != -EINVAL || !strstr(err, needle) || strncmp(err, "node 'n-1': ", 12) != 0)
        fail_msg("for %s: rc %d, error '%s', expected '%s'", json ? json : "(null)", rc, err,
                 needle);
    assert_null(in.id);
    assert_null(in.host);
}

static void test_thingworx_record(void **state)
{
    (void)state;
    struct zk_instance in = parse_ok("f00", twx, true);
    assert_string_equal(in.id, "b1d7c2e0-5a43-4f7e-9a51-0c2d3e4f5a6b");
    assert_string_equal(in.host, "10.0.0.11");
    assert_int_equal(in.port, 8443);
    assert_true(in.tls);
    assert_int_equal(in.weight, 1);
    assert_int_equal(in.priority, 0);
    assert_null(in.metadata);
    zk_instance_free(&in);

    in = parse_ok("f00", twx, false);
    assert_int_equal(in.port, 8080);
    assert_false(in.tls);
    zk_instance_free(&in);
}

static void test_port_choice(void **state)
{
    (void)state;
    /* HTTPS-only platform: port null. */
    const char *ssl_only = "{\"address\":\"h\",\"port\":null,\"sslPort\":443}";
    struct zk_instance in = parse_ok("a", ssl_only, true);
    assert_int_equal(in.port, 443);
    zk_instance_free(&in);
    expect_error(ssl_only, false, "no port");

    const char *http_only = "{\"address\":\"h\",\"port\":80}";
    in = parse_ok("a", http_only, false);
    assert_int_equal(in.port, 80);
    zk_instance_free(&in);
    expect_error(http_only, true, "no sslPort");
}

static void test_id_defaults_to_node(void **state)
{
    (void)state;
    struct zk_instance in = parse_ok("node-7", "{\"address\":\"h\",\"sslPort\":1}", true);
    assert_string_equal(in.id, "node-7");
    zk_instance_free(&in);
    in = parse_ok("node-7", "{\"id\":null,\"address\":\"h\",\"sslPort\":1}", true);
    assert_string_equal(in.id, "node-7");
    zk_instance_free(&in);
}

static void test_ipv6_and_names(void **state)
{
    (void)state;
    struct zk_instance in = parse_ok("a", "{\"address\":\"[fd00::12]\",\"sslPort\":8443}", true);
    assert_string_equal(in.host, "fd00::12");
    zk_instance_free(&in);
    in = parse_ok("a", "{\"address\":\"platform-1.example\",\"sslPort\":8443}", true);
    assert_string_equal(in.host, "platform-1.example");
    zk_instance_free(&in);
}

static void test_payload(void **state)
{
    (void)state;
    struct zk_instance in = parse_ok(
        "a",
        "{\"address\":\"h\",\"sslPort\":1,\"payload\":{\"@class\":\"x.Y\",\"zone\":\"b\xc3\xa9\"}}",
        true);
    assert_string_equal(in.metadata, "{\"@class\":\"x.Y\",\"zone\":\"b\\u00E9\"}");
    assert_int_equal(in.weight, 1);
    zk_instance_free(&in);

    in = parse_ok(
        "a", "{\"address\":\"h\",\"sslPort\":1,\"payload\":{\"weight\":0,\"priority\":2}}", true);
    assert_int_equal(in.weight, 0);
    assert_int_equal(in.priority, 2);
    zk_instance_free(&in);

    in = parse_ok("a", "{\"address\":\"h\",\"sslPort\":1,\"payload\":\"rack A\"}", true);
    assert_string_equal(in.metadata, "\"rack A\"");
    zk_instance_free(&in);

    /* A huge payload is shown cut, never refused. */
    size_t n = 5000;
    char *big = malloc(n + 100);
    assert_non_null(big);
    int o = snprintf(big, n + 100, "{\"address\":\"h\",\"sslPort\":1,\"payload\":\"");
    memset(big + o, 'x', n);
    snprintf(big + o + n, 100, "\"}");
    in = parse_ok("a", big, true);
    assert_int_equal(strlen(in.metadata), ZK_METADATA_MAX);
    assert_string_equal(in.metadata + ZK_METADATA_MAX - 3, "...");
    zk_instance_free(&in);
    free(big);

    expect_error("{\"address\":\"h\",\"sslPort\":1,\"payload\":{\"weight\":-1}}", true,
                 "payload.weight");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"payload\":{\"priority\":\"1\"}}", true,
                 "payload.priority");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"payload\":{\"weight\":4294967296}}", true,
                 "payload.weight");
}

static void test_bad_records(void **state)
{
    (void)state;
    expect_error(NULL, true, "no data");
    expect_error("", true, "no data");
    expect_error("not json", true, "not valid JSON");
    expect_error("{\"address\":\"h\",", true, "not valid JSON");
    expect_error("[1,2]", true, "expected a JSON object, found an array");
    expect_error("\"str\"", true, "expected a JSON object, found a string");
    expect_error("42", true, "expected a JSON object");
    expect_error("null", true, "expected a JSON object");
    expect_error("{}", true, "no address");
    expect_error("{\"sslPort\":1}", true, "no address");
    expect_error("{\"address\":null,\"sslPort\":1}", true, "no address");
    expect_error("{\"address\":7,\"sslPort\":1}", true, "address: expected a string");
    expect_error("{\"address\":\"\",\"sslPort\":1}", true, "address is empty");
    expect_error("{\"address\":\"[]\",\"sslPort\":1}", true, "address is empty");
    expect_error("{\"address\":\"a b\",\"sslPort\":1}", true, "not a host name");
    expect_error("{\"address\":\"h/x\",\"sslPort\":1}", true, "not a host name");
    expect_error("{\"address\":\"h\\n\",\"sslPort\":1}", true, "not a host name");
    expect_error("{\"address\":\"h\"}", true, "no sslPort");
    expect_error("{\"address\":\"h\",\"sslPort\":0}", true, "found 0");
    expect_error("{\"address\":\"h\",\"sslPort\":65536}", true, "found 65536");
    expect_error("{\"address\":\"h\",\"sslPort\":-1}", true, "found -1");
    expect_error("{\"address\":\"h\",\"sslPort\":\"8443\"}", true, "found a string");
    expect_error("{\"address\":\"h\",\"sslPort\":8443.0}", true, "found a real number");
    expect_error("{\"address\":\"h\",\"sslPort\":true}", true, "found a boolean");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"id\":5}", true, "id: expected a string");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"id\":\"\"}", true, "id is empty");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"id\":\"a\\u0001b\"}", true,
                 "control characters");
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"id\":\"a\\u0000b\"}", true, "");
    /* Duplicate keys would make "which port" ambiguous. */
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"sslPort\":2}", true, "not valid JSON");
}

static void test_huge_numbers(void **state)
{
    (void)state;
    expect_error("{\"address\":\"h\",\"sslPort\":99999999999999999999999}", true, "not valid JSON");
    expect_error("{\"address\":\"h\",\"sslPort\":9223372036854775807}", true,
                 "found 9223372036854775807");
    expect_error("{\"address\":\"h\",\"sslPort\":1e400}", true, "not valid JSON");
    /* A huge registrationTimeUTC we do not read still makes the JSON invalid. */
    expect_error("{\"address\":\"h\",\"sslPort\":1,\"registrationTimeUTC\":1e99999}", true,
                 "not valid JSON");
}

static void test_limits(void **state)
{
    (void)state;
    char id[ZK_ID_MAX + 64];
    memset(id, 'i', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0';
    char json[1024];
    snprintf(json, sizeof(json), "{\"address\":\"h\",\"sslPort\":1,\"id\":\"%s\"}", id);
    expect_error(json, true, "longer than 255");
    /* The node's name, when it is the id, is held to the same limits. */
    struct zk_instance in;
    char err[512];
    assert_int_equal(
        zk_instance_parse(id, "{\"address\":\"h\",\"sslPort\":1}", 28, true, &in, err, sizeof(err)),
        -EINVAL);
    assert_non_null(strstr(err, "..."));

    char *big = calloc(1, ZK_DATA_MAX + 2);
    assert_non_null(big);
    memset(big, ' ', ZK_DATA_MAX + 1);
    assert_int_equal(zk_instance_parse("a", big, ZK_DATA_MAX + 1, true, &in, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "larger than"));
    free(big);
}

/* Bytes in an error never break the log line. */
static void test_errors_are_one_line(void **state)
{
    (void)state;
    struct zk_instance in;
    char err[512];
    const char node[] = "bad\nnode\x1b[31m";
    assert_int_equal(zk_instance_parse(node, "x", 1, true, &in, err, sizeof(err)), -EINVAL);
    for (const char *p = err; *p; p++)
        assert_false((unsigned char)*p < 0x20);
}

/* ---- sets ---- */

struct skips {
    char msgs[8][512];
    size_t count;
};

static void collect(void *arg, const char *msg)
{
    struct skips *s = arg;
    if (s->count < 8)
        snprintf(s->msgs[s->count], sizeof(s->msgs[0]), "%s", msg);
    s->count++;
}

static struct zk_child kid(const char *name, const char *json)
{
    return (struct zk_child){name, json, json ? strlen(json) : 0, true};
}

static void test_set_sorted_and_skips(void **state)
{
    (void)state;
    struct zk_child kids[] = {
        kid("c", "{\"id\":\"p3\",\"address\":\"10.0.0.3\",\"sslPort\":8443}"),
        kid("bad", "{\"address\":\"10.0.0.9\""),
        kid("a", "{\"id\":\"p1\",\"address\":\"10.0.0.1\",\"sslPort\":8443}"),
        {"gone", NULL, 0, false},
        kid("noaddr", "{\"sslPort\":8443}"),
    };
    struct zk_set set;
    struct skips sk = {.count = 0};
    size_t bad = 0;
    char err[512];
    assert_int_equal(zk_build_set(kids, 5, true, &set, &bad, collect, &sk, err, sizeof(err)), 0);
    assert_int_equal(set.count, 2);
    assert_string_equal(set.items[0].id, "p1");
    assert_string_equal(set.items[1].id, "p3");
    assert_int_equal(bad, 2);
    assert_int_equal(sk.count, 2);
    assert_non_null(strstr(sk.msgs[0], "node 'bad'"));
    assert_non_null(strstr(sk.msgs[1], "node 'noaddr'"));
    assert_true(zk_set_equal(&set, &set));
    zk_set_free(&set);
}

static void test_set_all_bad_is_failure(void **state)
{
    (void)state;
    struct zk_child kids[] = {kid("x", "nope"), kid("y", "{}"), {"gone", NULL, 0, false}};
    struct zk_set set = {(void *)1, 9};
    size_t bad = 0;
    char err[512];
    assert_int_equal(zk_build_set(kids, 3, true, &set, &bad, NULL, NULL, err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(set.count, 0);
    assert_null(set.items);
    assert_int_equal(bad, 2);
    assert_non_null(strstr(err, "node 'x'"));
}

static void test_set_empty_answers(void **state)
{
    (void)state;
    struct zk_set set;
    size_t bad = 7;
    char err[64];
    assert_int_equal(zk_build_set(NULL, 0, true, &set, &bad, NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(set.count, 0);
    assert_int_equal(bad, 0);
    /* Every child vanished between the listing and the reads: empty, not bad. */
    struct zk_child gone[] = {{"a", NULL, 0, false}, {"b", NULL, 0, false}};
    assert_int_equal(zk_build_set(gone, 2, true, &set, &bad, NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(set.count, 0);
}

static void test_set_duplicate_ids(void **state)
{
    (void)state;
    struct zk_child kids[] = {
        kid("n2", "{\"id\":\"p\",\"address\":\"10.0.0.2\",\"sslPort\":1}"),
        kid("n1", "{\"id\":\"p\",\"address\":\"10.0.0.1\",\"sslPort\":1}"),
    };
    struct zk_set set;
    struct skips sk = {.count = 0};
    size_t bad = 0;
    char err[64];
    assert_int_equal(zk_build_set(kids, 2, true, &set, &bad, collect, &sk, err, sizeof(err)), 0);
    assert_int_equal(set.count, 1);
    assert_string_equal(set.items[0].host, "10.0.0.1"); /* the same whatever the order */
    assert_int_equal(bad, 1);
    assert_non_null(strstr(sk.msgs[0], "id 'p'"));
    zk_set_free(&set);
}

static void test_set_equal(void **state)
{
    (void)state;
    struct zk_child a[] = {kid("a", twx)};
    struct zk_child b[] = {kid("a", "{\"id\":\"b1d7c2e0-5a43-4f7e-9a51-0c2d3e4f5a6b\","
                                    "\"address\":\"10.0.0.11\",\"sslPort\":8444}")};
    struct zk_set x, y;
    size_t bad;
    char err[64];
    assert_int_equal(zk_build_set(a, 1, true, &x, &bad, NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(zk_build_set(b, 1, true, &y, &bad, NULL, NULL, err, sizeof(err)), 0);
    assert_false(zk_set_equal(&x, &y));
    zk_set_free(&y);
    assert_int_equal(zk_build_set(a, 1, true, &y, &bad, NULL, NULL, err, sizeof(err)), 0);
    assert_true(zk_set_equal(&x, &y));
    zk_set_free(&x);
    zk_set_free(&y);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_thingworx_record),
        cmocka_unit_test(test_port_choice),
        cmocka_unit_test(test_id_defaults_to_node),
        cmocka_unit_test(test_ipv6_and_names),
        cmocka_unit_test(test_payload),
        cmocka_unit_test(test_bad_records),
        cmocka_unit_test(test_huge_numbers),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_errors_are_one_line),
        cmocka_unit_test(test_set_sorted_and_skips),
        cmocka_unit_test(test_set_all_bad_is_failure),
        cmocka_unit_test(test_set_empty_answers),
        cmocka_unit_test(test_set_duplicate_ids),
        cmocka_unit_test(test_set_equal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
