/* The static discovery plugin's instances-file parser on its own: the whole
 * format, defaults, every error class with its file:line, and file reading
 * limits. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "static_parse.h"

#define ERR_MAX 32

struct errs {
    char msgs[ERR_MAX][512];
    size_t count;
};

static void collect(void *arg, const char *msg)
{
    struct errs *e = arg;
    if (e->count < ERR_MAX)
        snprintf(e->msgs[e->count], sizeof(e->msgs[0]), "%s", msg);
    e->count++;
}

static void dump(const struct errs *e)
{
    for (size_t i = 0; i < e->count && i < ERR_MAX; i++)
        fprintf(stderr, "  %s\n", e->msgs[i]);
}

static struct static_set parse_ok(const char *text)
{
    struct errs e = {.count = 0};
    struct static_set set;
    int rc = static_parse("i.yaml", text, strlen(text), &set, collect, &e);
    if (rc != 0)
        dump(&e);
    assert_int_equal(rc, 0);
    assert_int_equal(e.count, 0);
    return set;
}

/* Parsing fails and one of the errors is exactly `msg`. */
static void expect_error(const char *text, const char *msg)
{
    struct errs e = {.count = 0};
    struct static_set set = {(void *)1, 7};
    int rc = static_parse("i.yaml", text, strlen(text), &set, collect, &e);
    bool found = false;
    for (size_t i = 0; i < e.count && i < ERR_MAX; i++)
        found = found || strcmp(e.msgs[i], msg) == 0;
    if (!found) {
        fprintf(stderr, "expected: %s\ngot:\n", msg);
        dump(&e);
    }
    assert_int_equal(rc, -EINVAL);
    assert_true(found);
    assert_null(set.items);
    assert_int_equal(set.count, 0);
}

static const struct static_instance *find(const struct static_set *s, const char *id)
{
    for (size_t i = 0; i < s->count; i++)
        if (strcmp(s->items[i].id, id) == 0)
            return &s->items[i];
    return NULL;
}

static void test_full(void **state)
{
    (void)state;
    struct static_set s = parse_ok("# platforms\n"
                                   "instances:\n"
                                   "  - id: alpha\n"
                                   "    address: 10.0.0.1\n"
                                   "    port: 9001\n"
                                   "    tls: true\n"
                                   "    weight: 0\n"
                                   "    priority: 2\n"
                                   "    metadata: \"rack 1\"\n"
                                   "  - address: \"::1\"\n"
                                   "    port: 9002\n"
                                   "  - {address: platform-3.example, port: 65535, weight: 7}\n"
                                   "  - address: \"[fe80::1%eth0]\"\n"
                                   "    port: 1\n"
                                   "    tls: false\n");
    assert_int_equal(s.count, 4);
    /* Sorted by id. */
    assert_string_equal(s.items[0].id, "[::1]:9002");
    assert_string_equal(s.items[1].id, "[fe80::1%eth0]:1");
    assert_string_equal(s.items[2].id, "alpha");
    assert_string_equal(s.items[3].id, "platform-3.example:65535");

    const struct static_instance *a = find(&s, "alpha");
    assert_string_equal(a->host, "10.0.0.1");
    assert_int_equal(a->port, 9001);
    assert_true(a->tls);
    assert_int_equal(a->weight, 0);
    assert_int_equal(a->priority, 2);
    assert_string_equal(a->metadata, "rack 1");
    assert_int_equal(a->line, 3);

    const struct static_instance *b = find(&s, "[::1]:9002");
    assert_string_equal(b->host, "::1");
    assert_false(b->tls);
    assert_int_equal(b->weight, 1);
    assert_int_equal(b->priority, 0);
    assert_null(b->metadata);

    assert_int_equal(find(&s, "platform-3.example:65535")->weight, 7);
    assert_string_equal(find(&s, "[fe80::1%eth0]:1")->host, "fe80::1%eth0");
    static_set_free(&s);
}

static void test_empty_set(void **state)
{
    (void)state;
    struct static_set s = parse_ok("instances: []\n");
    assert_int_equal(s.count, 0);
    static_set_free(&s);
    s = parse_ok("---\ninstances: [ ]\n...\n");
    assert_int_equal(s.count, 0);
    static_set_free(&s);
}

static void test_null_optionals(void **state)
{
    (void)state;
    struct static_set s = parse_ok("instances:\n"
                                   "  - address: h\n"
                                   "    port: 80\n"
                                   "    id: ~\n"
                                   "    metadata: null\n");
    assert_int_equal(s.count, 1);
    assert_string_equal(s.items[0].id, "h:80");
    assert_null(s.items[0].metadata);
    static_set_free(&s);
}

static void test_structure_errors(void **state)
{
    (void)state;
    expect_error("",
                 "i.yaml:1: the file is empty: expected the key 'instances' (write [] for none)");
    expect_error("- a\n", "i.yaml:1: expected a map with the key 'instances', found a sequence");
    expect_error("other: 1\n", "i.yaml:1: unknown key \"other\" (known: instances)");
    expect_error("other: 1\n", "i.yaml:1: missing key 'instances'");
    expect_error("instances: []\ninstances: []\n",
                 "i.yaml:2: duplicate key 'instances' (first at line 1)");
    expect_error("instances:\n",
                 "i.yaml:1: instances: expected a sequence of maps (write [] for none), found "
                 "nothing");
    expect_error("instances: {a: 1}\n",
                 "i.yaml:1: instances: expected a sequence of maps (write [] for none), found a "
                 "map");
    expect_error("instances:\n  - just-a-host\n",
                 "i.yaml:2: instances[0]: expected a map, found \"just-a-host\"");
    expect_error("instances: []\n---\ninstances: []\n",
                 "i.yaml:2: only one YAML document is allowed");
}

static void test_syntax_error_line(void **state)
{
    (void)state;
    struct errs e = {.count = 0};
    struct static_set s;
    const char *text = "instances:\n  - address: a\n    port: [1\n";
    assert_int_equal(static_parse("i.yaml", text, strlen(text), &s, collect, &e), -EINVAL);
    assert_int_equal(e.count, 1);
    assert_non_null(strstr(e.msgs[0], "YAML syntax error"));
    assert_int_equal(strncmp(e.msgs[0], "i.yaml:4:", 9), 0);
}

static void test_key_errors(void **state)
{
    (void)state;
    expect_error("instances:\n  - address: a\n    port: 1\n    prot: 2\n",
                 "i.yaml:4: instances[0]: unknown key \"prot\" (known: id, address, port, tls, "
                 "weight, priority, metadata)");
    expect_error("instances:\n  - address: a\n    port: 1\n    port: 2\n",
                 "i.yaml:4: instances[0]: duplicate key 'port' (first at line 3)");
    expect_error("instances:\n  - port: 1\n", "i.yaml:2: instances[0]: missing key 'address'");
    expect_error("instances:\n  - address: a\n    port: 2\n  - address: b\n",
                 "i.yaml:4: instances[1]: missing key 'port'");
    expect_error("instances:\n  - address: ~\n    port: 2\n",
                 "i.yaml:2: address: a host name or IP address is required");
}

static void test_value_errors(void **state)
{
    (void)state;
#define ONE(line_) "instances:\n  - address: a\n    " line_ "\n"
    expect_error(ONE("port: 0"), "i.yaml:3: port: expected an integer 1..65535, found \"0\"");
    expect_error(ONE("port: 65536"),
                 "i.yaml:3: port: expected an integer 1..65535, found \"65536\"");
    expect_error(ONE("port: \"9001\""),
                 "i.yaml:3: port: expected an integer 1..65535, found \"9001\"");
    expect_error(ONE("port: 0x10"), "i.yaml:3: port: expected an integer 1..65535, found \"0x10\"");
    expect_error(ONE("port: [1]"),
                 "i.yaml:3: port: expected an integer 1..65535, found a sequence");
    expect_error(ONE("port: 1\n    tls: yes"),
                 "i.yaml:4: tls: expected true or false, found \"yes\"");
    expect_error(ONE("port: 1\n    weight: -1"),
                 "i.yaml:4: weight: expected an integer 0..4294967295, found \"-1\"");
    expect_error(ONE("port: 1\n    priority: 1.5"),
                 "i.yaml:4: priority: expected an integer 0..4294967295, found \"1.5\"");
    expect_error(ONE("port: 1\n    weight: 4294967296"),
                 "i.yaml:4: weight: expected an integer 0..4294967295, found \"4294967296\"");
    expect_error(ONE("port: 1\n    metadata: {a: b}"),
                 "i.yaml:4: metadata: expected a string, found a map");
    expect_error(ONE("port: 1\n    id: \"a\\x01b\""),
                 "i.yaml:4: id: control characters are not allowed");
    expect_error(ONE("port: 1\n    id: \"\""), "i.yaml:4: id: expected 1..255 characters, found 0");
#undef ONE
    expect_error("instances:\n  - address: \"a b\"\n    port: 1\n",
                 "i.yaml:2: address: expected a host name or IP address, found \"a b\"");
    expect_error("instances:\n  - address: \"1::2::3\"\n    port: 1\n",
                 "i.yaml:2: address: expected a host name or IP address, found \"1::2::3\"");
    expect_error("instances:\n  - address: \"host%eth0\"\n    port: 1\n",
                 "i.yaml:2: address: expected a host name or IP address, found \"host%eth0\"");
}

static void test_duplicate_ids(void **state)
{
    (void)state;
    expect_error("instances:\n"
                 "  - {address: a, port: 1}\n"
                 "  - {address: a, port: 1}\n",
                 "i.yaml:3: instances: duplicate id 'a:1' (first at line 2)");
    expect_error("instances:\n"
                 "  - {id: x, address: a, port: 1}\n"
                 "  - {id: x, address: b, port: 2}\n",
                 "i.yaml:3: instances: duplicate id 'x' (first at line 2)");
}

static void test_every_error_reported(void **state)
{
    (void)state;
    struct errs e = {.count = 0};
    struct static_set s;
    const char *text = "instances:\n"
                       "  - {address: a, port: 0}\n"
                       "  - {address: b, port: 1, tls: maybe}\n"
                       "  - {address: c}\n";
    assert_int_equal(static_parse("i.yaml", text, strlen(text), &s, collect, &e), -EINVAL);
    assert_int_equal(e.count, 3);
}

static void test_long_value_is_bounded(void **state)
{
    (void)state;
    char text[2048];
    char big[600];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    snprintf(text, sizeof(text), "instances:\n  - {address: a, port: 1, %s: 1}\n", big);
    struct errs e = {.count = 0};
    struct static_set s;
    assert_int_equal(static_parse("i.yaml", text, strlen(text), &s, collect, &e), -EINVAL);
    assert_int_equal(e.count, 1);
    assert_true(strlen(e.msgs[0]) < 200);
    assert_non_null(strstr(e.msgs[0], "...\""));
}

static void test_set_equal(void **state)
{
    (void)state;
    struct static_set a = parse_ok("instances:\n  - {address: a, port: 1}\n"
                                   "  - {address: b, port: 2, metadata: m}\n");
    struct static_set b = parse_ok("instances:\n  - {address: b, port: 2, metadata: m}\n"
                                   "  - {address: a, port: 1}\n");
    struct static_set c = parse_ok("instances:\n  - {address: b, port: 2, metadata: n}\n"
                                   "  - {address: a, port: 1}\n");
    struct static_set d = parse_ok("instances:\n  - {address: a, port: 1}\n");
    assert_true(static_set_equal(&a, &b)); /* order in the file does not matter */
    assert_false(static_set_equal(&a, &c));
    assert_false(static_set_equal(&a, &d));
    static_set_free(&a);
    static_set_free(&b);
    static_set_free(&c);
    static_set_free(&d);
}

static void test_read_file(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof(tmpl), "%s/emx-static-parse-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    char path[600];
    snprintf(path, sizeof(path), "%s/f.yaml", d);

    char *text = NULL;
    size_t len = 0;
    assert_int_equal(static_read_file(path, 100, &text, &len), -ENOENT);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("instances: []\n", f);
    fclose(f);
    assert_int_equal(static_read_file(path, 100, &text, &len), 0);
    assert_int_equal(len, 14);
    assert_string_equal(text, "instances: []\n");
    free(text);
    assert_int_equal(static_read_file(path, 14, &text, &len), 0);
    free(text);
    assert_int_equal(static_read_file(path, 13, &text, &len), -EFBIG);
    assert_int_equal(static_read_file(d, 100, &text, &len), -EINVAL);
    unlink(path);
    rmdir(d);
}

/* The sample shipped in conf/ is valid. */
static void test_sample_file(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    struct errs e = {.count = 0};
    struct static_set set;
    assert_int_equal(static_read_file(EMX_SOURCE_DIR "/conf/instances.yaml", 1 << 20, &text, &len),
                     0);
    int rc = static_parse("instances.yaml", text, len, &set, collect, &e);
    dump(&e);
    assert_int_equal(rc, 0);
    assert_int_equal(set.count, 3);
    for (size_t i = 0; i < set.count; i++)
        assert_int_equal(set.items[i].port, 9001 + i);
    static_set_free(&set);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_empty_set),
        cmocka_unit_test(test_null_optionals),
        cmocka_unit_test(test_structure_errors),
        cmocka_unit_test(test_syntax_error_line),
        cmocka_unit_test(test_key_errors),
        cmocka_unit_test(test_value_errors),
        cmocka_unit_test(test_duplicate_ids),
        cmocka_unit_test(test_every_error_reported),
        cmocka_unit_test(test_long_value_is_bounded),
        cmocka_unit_test(test_set_equal),
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_sample_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
