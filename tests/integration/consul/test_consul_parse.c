/* The consul plugin's answer parser on its own: the documented
 * /v1/health/service shape, address fallback, defaults for missing fields,
 * wrong types, huge numbers, tag and check filtering, and X-Consul-Index. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "consul_parse.h"

/* The example answer of Consul's Health HTTP API documentation (trimmed of
 * fields the plugin ignores, plus Weights and Meta). */
static const char doc_answer[] =
    "[{\"Node\": {\"ID\": \"40e4a748-2192-161a-0510-9bf59fe950b5\", \"Node\": \"foobar\","
    "  \"Address\": \"10.1.10.12\", \"Datacenter\": \"dc1\","
    "  \"TaggedAddresses\": {\"lan\": \"10.1.10.12\", \"wan\": \"10.1.10.12\"},"
    "  \"Meta\": {\"instance_type\": \"t2.medium\"}},"
    " \"Service\": {\"ID\": \"redis\", \"Service\": \"redis\", \"Tags\": [\"primary\"],"
    "  \"Address\": \"10.1.10.12\", \"TaggedAddresses\": {\"lan\": {\"address\": \"10.1.10.12\","
    "  \"port\": 8000}}, \"Meta\": {\"redis_version\": \"4.0\", \"edgemux-priority\": \"2\"},"
    "  \"Port\": 8000, \"Weights\": {\"Passing\": 10, \"Warning\": 1},"
    "  \"Namespace\": \"default\"},"
    " \"Checks\": [{\"Node\": \"foobar\", \"CheckID\": \"service:redis\","
    "  \"Name\": \"Service 'redis' check\", \"Status\": \"passing\", \"Notes\": \"\","
    "  \"Output\": \"\", \"ServiceID\": \"redis\", \"ServiceName\": \"redis\","
    "  \"ServiceTags\": [\"primary\"], \"Namespace\": \"default\"},"
    "  {\"Node\": \"foobar\", \"CheckID\": \"serfHealth\", \"Name\": \"Serf Health Status\","
    "  \"Status\": \"passing\", \"Notes\": \"\", \"Output\": \"\", \"ServiceID\": \"\","
    "  \"ServiceName\": \"\", \"ServiceTags\": [], \"Namespace\": \"default\"}]}]";

static const struct consul_filter std_filter = {NULL, "edgemux-priority", "edgemux-tls", false};

static char err[256];

static int parse(const char *json, const struct consul_filter *f, struct consul_set *set)
{
    return consul_parse(json, strlen(json), f ? f : &std_filter, set, err, sizeof(err));
}

/* One entry built from the parts that vary. */
static const char *entry(char *buf, size_t size, const char *node, const char *service)
{
    snprintf(buf, size, "[{\"Node\": %s, \"Service\": %s, \"Checks\": []}]", node, service);
    return buf;
}

#define NODE_OK "{\"Node\": \"n1\", \"Address\": \"10.0.0.1\"}"

static void expect_error(const char *node, const char *service, const char *needle)
{
    char buf[2048];
    struct consul_set set = {(void *)1, 99, 0};
    assert_int_equal(parse(entry(buf, sizeof(buf), node, service), NULL, &set), -EINVAL);
    assert_null(set.items);
    assert_int_equal(set.count, 0);
    if (!strstr(err, needle))
        fail_msg("error \"%s\" lacks \"%s\"", err, needle);
}

static void expect_one(const char *node, const char *service, struct consul_set *set)
{
    char buf[2048];
    if (parse(entry(buf, sizeof(buf), node, service), NULL, set) != 0)
        fail_msg("parse failed: %s", err);
    assert_int_equal(set->count, 1);
}

static void test_documented_shape(void **state)
{
    (void)state;
    struct consul_set set;
    assert_int_equal(parse(doc_answer, NULL, &set), 0);
    assert_int_equal(set.count, 1);
    assert_string_equal(set.items[0].id, "foobar/redis");
    assert_string_equal(set.items[0].host, "10.1.10.12");
    assert_int_equal(set.items[0].port, 8000);
    assert_int_equal(set.items[0].weight, 10);
    assert_int_equal(set.items[0].priority, 2);
    assert_false(set.items[0].tls);
    assert_string_equal(set.items[0].metadata, "node=foobar service=redis");
    assert_true(consul_set_equal(&set, &set));
    consul_set_free(&set);
    assert_null(set.items);
}

static void test_empty_array(void **state)
{
    (void)state;
    struct consul_set set;
    assert_int_equal(parse("[]", NULL, &set), 0);
    assert_int_equal(set.count, 0);
    assert_int_equal(parse(" [ ] \n", NULL, &set), 0);
    consul_set_free(&set);
}

static void test_address_fallback(void **state)
{
    (void)state;
    struct consul_set set;
    expect_one(NODE_OK, "{\"ID\": \"a\", \"Address\": \"\", \"Port\": 1}", &set);
    assert_string_equal(set.items[0].host, "10.0.0.1");
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"a\", \"Port\": 1}", &set);
    assert_string_equal(set.items[0].host, "10.0.0.1");
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"a\", \"Address\": null, \"Port\": 1}", &set);
    assert_string_equal(set.items[0].host, "10.0.0.1");
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"a\", \"Address\": \"fd00::7\", \"Port\": 65535}", &set);
    assert_string_equal(set.items[0].host, "fd00::7");
    assert_int_equal(set.items[0].port, 65535);
    consul_set_free(&set);
    expect_error("{\"Node\": \"n1\", \"Address\": \"\"}", "{\"ID\": \"a\", \"Port\": 1}",
                 "no Service.Address and no Node.Address");
    expect_error("{\"Node\": \"n1\"}", "{\"ID\": \"a\", \"Address\": \"\", \"Port\": 1}",
                 "no Service.Address");
}

static void test_defaults(void **state)
{
    (void)state;
    struct consul_set set;
    /* No Weights, Meta, Tags, Checks: weight 1, priority 0, tls from the filter. */
    char buf[512];
    snprintf(buf, sizeof(buf), "[{\"Node\": %s, \"Service\": {\"ID\": \"s\", \"Port\": 9}}]",
             NODE_OK);
    struct consul_filter tls_on = std_filter;
    tls_on.tls_default = true;
    assert_int_equal(parse(buf, &tls_on, &set), 0);
    assert_int_equal(set.items[0].weight, 1);
    assert_int_equal(set.items[0].priority, 0);
    assert_true(set.items[0].tls);
    assert_string_equal(set.items[0].metadata, "node=n1 service=");
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"s\", \"Port\": 9, \"Weights\": null, \"Meta\": null}", &set);
    assert_int_equal(set.items[0].weight, 1);
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"s\", \"Port\": 9, \"Weights\": {\"Warning\": 3}}", &set);
    assert_int_equal(set.items[0].weight, 1);
    consul_set_free(&set);
    expect_one(NODE_OK, "{\"ID\": \"s\", \"Port\": 9, \"Weights\": {\"Passing\": 0}}", &set);
    assert_int_equal(set.items[0].weight, 0);
    consul_set_free(&set);
    /* The tls key in Meta overrides the option, both ways. */
    expect_one(NODE_OK, "{\"ID\": \"s\", \"Port\": 9, \"Meta\": {\"edgemux-tls\": \"true\"}}",
               &set);
    assert_true(set.items[0].tls);
    consul_set_free(&set);
    snprintf(buf, sizeof(buf),
             "[{\"Node\": %s, \"Service\": {\"ID\": \"s\", \"Port\": 9, \"Meta\": "
             "{\"edgemux-tls\": \"false\"}}}]",
             NODE_OK);
    assert_int_equal(parse(buf, &tls_on, &set), 0);
    assert_false(set.items[0].tls);
    consul_set_free(&set);
    /* Without meta keys configured, Meta is not read for them. */
    struct consul_filter bare = {NULL, NULL, NULL, false};
    snprintf(buf, sizeof(buf),
             "[{\"Node\": %s, \"Service\": {\"ID\": \"s\", \"Port\": 9, \"Meta\": "
             "{\"edgemux-priority\": \"x\"}}}]",
             NODE_OK);
    assert_int_equal(parse(buf, &bare, &set), 0);
    consul_set_free(&set);
}

static void test_missing_fields(void **state)
{
    (void)state;
    char buf[512];
    struct consul_set set;
    expect_error(NODE_OK, "{\"ID\": \"s\"}", "Service.Port missing");
    expect_error(NODE_OK, "{\"Port\": 1}", "Service.ID missing");
    expect_error(NODE_OK, "{\"ID\": \"\", \"Port\": 1}", "Service.ID is empty");
    expect_error("{\"Address\": \"10.0.0.1\"}", "{\"ID\": \"s\", \"Port\": 1}",
                 "Node.Node missing");
    expect_error("null", "{\"ID\": \"s\", \"Port\": 1}", "Node: expected an object");
    expect_error(NODE_OK, "null", "Service: expected an object");
    assert_int_equal(parse("[{\"Service\": {\"ID\": \"s\", \"Port\": 1}}]", NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "entry 0: Node"));
    snprintf(buf, sizeof(buf), "[{\"Node\": %s}]", NODE_OK);
    assert_int_equal(parse(buf, NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "Service"));
}

static void test_wrong_types(void **state)
{
    (void)state;
    struct consul_set set;
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": \"8443\"}",
                 "Service.Port: expected an integer, found a string");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 8443.0}", "found a real number");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": true}", "found a boolean");
    expect_error(NODE_OK, "{\"ID\": 7, \"Port\": 1}", "Service.ID: expected a string");
    expect_error("{\"Node\": \"n\", \"Address\": 10}", "{\"ID\": \"s\", \"Port\": 1}",
                 "Node.Address: expected a string, found an integer");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Address\": [\"a\"]}",
                 "Service.Address: expected a string, found an array");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Tags\": \"primary\"}",
                 "Service.Tags: expected an array");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Tags\": [\"a\", 2]}",
                 "Service.Tags[1]: expected a string");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Weights\": 5}",
                 "Service.Weights: expected an object");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Weights\": {\"Passing\": \"5\"}}",
                 "Service.Weights.Passing: expected an integer");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Meta\": []}",
                 "Service.Meta: expected an object");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Meta\": {\"edgemux-priority\": 3}}",
                 "Service.Meta.edgemux-priority: expected a string");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Meta\": {\"edgemux-priority\": \"-1\"}}",
                 "expected an integer 0..4294967295, found \"-1\"");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Meta\": {\"edgemux-tls\": \"yes\"}}",
                 "expected \"true\" or \"false\"");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Address\": \"a\\nb\"}",
                 "control character");
    /* Whole-answer shapes. */
    assert_int_equal(parse("{}", NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "expected a JSON array, found an object"));
    assert_int_equal(parse("[1]", NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "entry 0: expected an object"));
    assert_int_equal(parse("[{\"Node\": {}, ", NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "bad JSON"));
    assert_int_equal(parse("", NULL, &set), -EINVAL);
    assert_int_equal(consul_parse("[]\0junk", 7, &std_filter, &set, err, sizeof(err)), -EINVAL);
    assert_int_equal(parse("[] []", NULL, &set), -EINVAL);
    assert_int_equal(parse("[{\"Node\": {\"Node\": \"a\", \"Node\": \"b\"}}]", NULL, &set),
                     -EINVAL);
    assert_non_null(strstr(err, "duplicate"));
    /* Checks must be objects with a Status. */
    char buf[512];
    snprintf(buf, sizeof(buf),
             "[{\"Node\": %s, \"Service\": {\"ID\": \"s\", \"Port\": 1}, \"Checks\": [{}]}]",
             NODE_OK);
    assert_int_equal(parse(buf, NULL, &set), -EINVAL);
    assert_non_null(strstr(err, "Checks[0].Status"));
    /* A NULL or tiny error buffer is safe. */
    assert_int_equal(consul_parse("{}", 2, NULL, &set, NULL, 0), -EINVAL);
    char tiny[4];
    assert_int_equal(consul_parse("{}", 2, NULL, &set, tiny, sizeof(tiny)), -EINVAL);
    assert_int_equal(strlen(tiny), 3);
}

static void test_huge_numbers(void **state)
{
    (void)state;
    struct consul_set set;
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 65536}", "65536 out of 1..65535");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 0}", "out of 1..65535");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": -1}", "out of 1..65535");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 9223372036854775807}", "out of 1..65535");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 99999999999999999999999}", "bad JSON");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1e400}", "bad JSON");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Weights\": {\"Passing\": 4294967296}}",
                 "out of 0..4294967295");
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": 1, \"Weights\": {\"Passing\": -5}}",
                 "out of 0..4294967295");
    expect_error(NODE_OK,
                 "{\"ID\": \"s\", \"Port\": 1, \"Meta\": {\"edgemux-priority\": \"4294967296\"}}",
                 "found \"4294967296\"");
    expect_error(NODE_OK,
                 "{\"ID\": \"s\", \"Port\": 1, \"Meta\": {\"edgemux-priority\": "
                 "\"99999999999999999999999999999\"}}",
                 "expected an integer");
    expect_one(NODE_OK,
               "{\"ID\": \"s\", \"Port\": 1, \"Weights\": {\"Passing\": 4294967295}, \"Meta\": "
               "{\"edgemux-priority\": \"4294967295\"}}",
               &set);
    assert_int_equal(set.items[0].weight, UINT32_MAX);
    assert_int_equal(set.items[0].priority, UINT32_MAX);
    consul_set_free(&set);
    /* Over-long strings are refused before they reach a log line. */
    char svc[1024], id[400];
    memset(id, 'x', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0';
    snprintf(svc, sizeof(svc), "{\"ID\": \"%s\", \"Port\": 1}", id);
    expect_error(NODE_OK, svc, "longer than 255 bytes");
}

static const char three[] =
    "[{\"Node\": {\"Node\": \"n2\", \"Address\": \"10.0.0.2\"}, \"Service\": {\"ID\": \"p\","
    "  \"Port\": 2, \"Tags\": [\"blue\", \"green\"]}},"
    " {\"Node\": {\"Node\": \"n1\", \"Address\": \"10.0.0.1\"}, \"Service\": {\"ID\": \"p\","
    "  \"Port\": 1, \"Tags\": [\"blue\"]}},"
    " {\"Node\": {\"Node\": \"n3\", \"Address\": \"10.0.0.3\"}, \"Service\": {\"ID\": \"p\","
    "  \"Port\": 3, \"Tags\": null},"
    "  \"Checks\": [{\"Status\": \"passing\"}, {\"Status\": \"critical\"}]}]";

static void test_tag_and_check_filtering(void **state)
{
    (void)state;
    struct consul_set set;
    /* No tag: the critical entry is still left out (we asked for ?passing). */
    assert_int_equal(parse(three, NULL, &set), 0);
    assert_int_equal(set.count, 2);
    assert_int_equal(set.skipped, 1);
    assert_string_equal(set.items[0].id, "n1/p"); /* sorted by id */
    assert_string_equal(set.items[1].id, "n2/p");
    consul_set_free(&set);

    struct consul_filter f = std_filter;
    f.tag = "green";
    assert_int_equal(parse(three, &f, &set), 0);
    assert_int_equal(set.count, 1);
    assert_int_equal(set.skipped, 2);
    assert_string_equal(set.items[0].id, "n2/p");
    consul_set_free(&set);

    f.tag = "blue";
    assert_int_equal(parse(three, &f, &set), 0);
    assert_int_equal(set.count, 2);
    consul_set_free(&set);

    f.tag = "Blue"; /* tags are case-sensitive */
    assert_int_equal(parse(three, &f, &set), 0);
    assert_int_equal(set.count, 0);
    consul_set_free(&set);

    /* Filtered-out entries are still validated. */
    f.tag = "green";
    expect_error(NODE_OK, "{\"ID\": \"s\", \"Port\": \"1\"}", "Service.Port");
}

static void test_ids_and_equality(void **state)
{
    (void)state;
    struct consul_set a, b;
    static const char dup[] = "[{\"Node\": {\"Node\": \"n\", \"Address\": \"h\"}, \"Service\": "
                              "{\"ID\": \"s\", \"Port\": 1}},"
                              " {\"Node\": {\"Node\": \"n\", \"Address\": \"h\"}, \"Service\": "
                              "{\"ID\": \"s\", \"Port\": 2}}]";
    assert_int_equal(parse(dup, NULL, &a), -EINVAL);
    assert_non_null(strstr(err, "duplicate instance id \"n/s\""));
    /* Same node, two service IDs: two instances. */
    static const char two[] = "[{\"Node\": {\"Node\": \"n\", \"Address\": \"h\"}, \"Service\": "
                              "{\"ID\": \"s2\", \"Port\": 1}},"
                              " {\"Node\": {\"Node\": \"n\", \"Address\": \"h\"}, \"Service\": "
                              "{\"ID\": \"s1\", \"Port\": 2}}]";
    assert_int_equal(parse(two, NULL, &a), 0);
    assert_int_equal(a.count, 2);
    assert_string_equal(a.items[0].id, "n/s1");
    assert_int_equal(parse(two, NULL, &b), 0);
    assert_true(consul_set_equal(&a, &b));
    b.items[1].weight = 7;
    assert_false(consul_set_equal(&a, &b));
    consul_set_free(&b);
    assert_int_equal(parse("[]", NULL, &b), 0);
    assert_false(consul_set_equal(&a, &b));
    consul_set_free(&a);
    consul_set_free(&b);
}

static void test_index_header(void **state)
{
    (void)state;
    uint64_t v = 77;
    assert_int_equal(consul_parse_index("123", 3, &v), 0);
    assert_int_equal(v, 123);
    assert_int_equal(consul_parse_index(" 42 \r\n", 6, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(consul_parse_index("0", 1, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(consul_parse_index("18446744073709551615", 20, &v), 0);
    assert_true(v == UINT64_MAX);
    v = 5;
    assert_int_equal(consul_parse_index("18446744073709551616", 20, &v), -EINVAL);
    assert_int_equal(consul_parse_index("", 0, &v), -EINVAL);
    assert_int_equal(consul_parse_index(" \r\n", 3, &v), -EINVAL);
    assert_int_equal(consul_parse_index("-1", 2, &v), -EINVAL);
    assert_int_equal(consul_parse_index("12abc", 5, &v), -EINVAL);
    assert_int_equal(consul_parse_index("1 2", 3, &v), -EINVAL);
    assert_int_equal(consul_parse_index("0x10", 4, &v), -EINVAL);
    assert_int_equal(v, 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_documented_shape), cmocka_unit_test(test_empty_array),
        cmocka_unit_test(test_address_fallback), cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_missing_fields),   cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_huge_numbers),     cmocka_unit_test(test_tag_and_check_filtering),
        cmocka_unit_test(test_ids_and_equality), cmocka_unit_test(test_index_header),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
