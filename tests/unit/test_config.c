/* Config: YAML tree, value syntax, binding, every error class with its
 * file:line and key, plugin binding and unknown keys, allocation failures. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "alloc.h"
#include "config.h"

#define DATA        EMX_TEST_DATA_DIR "/config/"
#define SAMPLE_CONF EMX_TEST_DATA_DIR "/../../conf/edgemux.yaml"

static void dump(const struct emx_errors *e)
{
    for (size_t i = 0; i < e->count; i++)
        fprintf(stderr, "  %s\n", e->msgs[i]);
}

static struct emx_config *load_ok(const char *text)
{
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    int rc = emx_config_load_string("t.yaml", text, strlen(text), &cfg, &e);
    if (rc != 0)
        dump(&e);
    assert_int_equal(rc, 0);
    assert_non_null(cfg);
    assert_int_equal(e.count, 0);
    emx_errors_free(&e);
    return cfg;
}

static bool has_msg(const struct emx_errors *e, const char *msg)
{
    for (size_t i = 0; i < e->count; i++)
        if (strcmp(e->msgs[i], msg) == 0)
            return true;
    return false;
}

/* Loading `text` fails and one of the errors is exactly `msg`. */
static void expect_error(const char *text, const char *msg)
{
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    int rc = emx_config_load_string("t.yaml", text, strlen(text), &cfg, &e);
    if (!has_msg(&e, msg)) {
        fprintf(stderr, "expected: %s\ngot:\n", msg);
        dump(&e);
    }
    assert_int_not_equal(rc, 0);
    assert_null(cfg);
    assert_true(has_msg(&e, msg));
    emx_errors_free(&e);
}

#define NAME "server: {name: a}\n"

/* ---- values ---- */

static void test_size(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t v;
    } good[] = {
        {"0", 0},
        {"1", 1},
        {"123456", 123456},
        {"64b", 64},
        {"64B", 64},
        {"64k", 65536},
        {"64K", 65536},
        {"64KiB", 65536},
        {"64kib", 65536},
        {"64kb", 65536},
        {"64kB", 65536},
        {"64 KiB", 65536},
        {"1m", 1048576},
        {"1M", 1048576},
        {"1MiB", 1048576},
        {"1mb", 1048576},
        {"2g", 2147483648ull},
        {"1GiB", 1073741824ull},
        {"1GB", 1073741824ull},
        {"18446744073709551615", UINT64_MAX},
        {"17179869183GiB", 17179869183ull << 30},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        uint64_t v = 7;
        if (emx_parse_size(good[i].text, &v) != 0)
            fail_msg("refused %s", good[i].text);
        assert_int_equal(v, good[i].v);
    }
    static const char *const bad[] = {
        "",
        "k",
        "-1",
        "+1",
        "1.5k",
        "64kk",
        "64 ",
        " 64",
        "64  KiB",
        "64KB!",
        "1TiB",
        "abc",
        "0x10",
        "64 k b",
        "1e3",
        "64i",
        "12 34",
        "18446744073709551616",
        "17179869184GiB",
        "16777216TiB",
        "36028797018963968k",
        "64\tKiB",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 7;
        if (emx_parse_size(bad[i], &v) != -EINVAL)
            fail_msg("accepted '%s'", bad[i]);
        assert_int_equal(v, 7); /* untouched */
    }
    uint64_t v;
    assert_int_equal(emx_parse_size(NULL, &v), -EINVAL);
}

static void test_duration(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t ms;
    } good[] = {
        {"0", 0},
        {"00", 0},
        {"0.0", 0},
        {"0s", 0},
        {"0ms", 0},
        {"1ms", 1},
        {"250ms", 250},
        {"250MS", 250},
        {"30s", 30000},
        {"30 s", 30000},
        {"1.5s", 1500},
        {"0.25s", 250},
        {"5m", 300000},
        {"1.5m", 90000},
        {"1h", 3600000},
        {"2.5h", 9000000},
        {"20 seconds", 20000},
        {"1 second", 1000},
        {"3 minutes", 180000},
        {"2 hours", 7200000},
        {"500 millis", 500},
        {"1.000000000000s", 1000},
        {"0.001s", 1},
        {"18446744073709551615ms", UINT64_MAX},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        uint64_t v = 7;
        if (emx_parse_duration(good[i].text, &v) != 0)
            fail_msg("refused %s", good[i].text);
        assert_int_equal(v, good[i].ms);
    }
    static const char *const bad[] = {
        "",
        "30",
        "1",
        "250.5",
        "s",
        "-1s",
        "+1s",
        ".5s",
        "1.s",
        "1.5ms",
        "0.0001s",
        "30x",
        "30 s ",
        "30sec",
        "1d",
        "1e3ms",
        "18446744073709551616ms",
        "5124095576030432h",
        "1.5.s",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 7;
        if (emx_parse_duration(bad[i], &v) != -EINVAL)
            fail_msg("accepted '%s'", bad[i]);
        assert_int_equal(v, 7);
    }
}

static void test_bool(void **state)
{
    (void)state;
    static const char *const yes[] = {"true", "True", "TRUE", "yes", "Yes", "on", "ON"};
    static const char *const no[] = {"false", "False", "no", "NO", "off", "Off"};
    bool b;
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        b = false;
        assert_int_equal(emx_parse_bool(yes[i], &b), 0);
        assert_true(b);
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        b = true;
        assert_int_equal(emx_parse_bool(no[i], &b), 0);
        assert_false(b);
    }
    static const char *const bad[] = {"", "1", "0", "y", "n", "truee", "enabled"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(emx_parse_bool(bad[i], &b), -EINVAL);
}

/* ---- good configs ---- */

static struct emx_config *load_file_ok(const char *path)
{
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    int rc = emx_config_load(path, &cfg, &e);
    if (rc != 0)
        dump(&e);
    assert_int_equal(rc, 0);
    assert_int_equal(e.count, 0);
    emx_errors_free(&e);
    return cfg;
}

static void assert_defaults_except_name(const struct emx_config *c)
{
    assert_int_equal(c->server.workers, 1);
    assert_null(c->server.user);
    assert_string_equal(c->plugins.dir, EMX_DEFAULT_PLUGIN_DIR);
    assert_string_equal(c->log.level, "info");
    assert_string_equal(c->log.format, "text");
    assert_string_equal(c->edge.address, "0.0.0.0");
    assert_int_equal(c->edge.port, 8080);
    assert_string_equal(c->edge.path, "/Thingworx/WS");
    assert_null(c->edge.tls_cert);
    assert_null(c->edge.tls_key);
    assert_null(c->edge.tls_ca);
    assert_false(c->edge.tls_client_cert);
    assert_int_equal(c->edge.max_message_size, 2 * 1024 * 1024);
    assert_int_equal(c->edge.auth_timeout, 15000);
    assert_int_equal(c->edge.idle_timeout, 120000);
    assert_int_equal(c->edge.request_timeout, 30000);
    assert_int_equal(c->edge.max_pending, 500);
    assert_int_equal(c->edge.max_queued, 1024 * 1024);
    assert_int_equal(c->edge.max_connections, 0);
    assert_true(c->edge.deflate);
    assert_int_equal(c->edge.trusted_proxies.count, 0);
    assert_int_equal(c->edge.max_connections_per_source, 0);
    assert_int_equal(c->edge.max_msgs_per_sec, 0);
    assert_int_equal(c->edge.max_things, 10000);
    assert_int_equal(c->edge.drain_spread, 5000);
    assert_string_equal(c->platform.path, "/Thingworx/WS");
    assert_null(c->platform.app_key);
    assert_null(c->platform.app_key_file);
    assert_int_equal(c->platform.pipes_per_instance, 5);
    assert_int_equal(c->platform.high_watermark, 65536);
    assert_int_equal(c->platform.low_watermark, 32768);
    assert_int_equal(c->platform.ping_interval, 30000);
    assert_int_equal(c->platform.idle_read_timeout, 60000);
    assert_int_equal(c->platform.connect_timeout, 10000);
    assert_int_equal(c->platform.request_timeout, 8000);
    assert_int_equal(c->platform.stall_after, 2000);
    assert_int_equal(c->platform.multipart_pin_wait, 2000);
    assert_int_equal(c->platform.all_down_grace, 3000);
    assert_int_equal(c->platform.close_spread, 0);
    assert_int_equal(c->platform.sndbuf, 256 * 1024);
    assert_int_equal(c->platform.reconnect_min, 250);
    assert_int_equal(c->platform.reconnect_max, 30000);
    assert_null(c->platform.tls_ca);
    assert_null(c->platform.tls_cert);
    assert_null(c->platform.tls_key);
    assert_true(c->platform.tls_verify);
    assert_string_equal(c->discovery.plugin, "static");
    assert_int_equal(c->discovery.empty_confirm, 10000);
    assert_string_equal(c->transport.plugin, "ws");
    assert_string_equal(c->admin.listen, "127.0.0.1:9900");
    assert_string_equal(c->admin.agent_listen, "");
}

static void test_minimal(void **state)
{
    (void)state;
    struct emx_config *c = load_file_ok(DATA "minimal.yaml");
    assert_string_equal(c->file, DATA "minimal.yaml");
    assert_string_equal(c->server.name, "edgemux-1");
    assert_defaults_except_name(c);
    assert_null(c->discovery.node);
    assert_null(c->transport.node);
    struct emx_errors e = {0};
    assert_int_equal(emx_config_check_unused(c, &e), 0);
    emx_config_free(c);
}

static void test_full(void **state)
{
    (void)state;
    struct emx_config *c = load_file_ok(DATA "full.yaml");
    assert_string_equal(c->server.name, "edgemux-full");
    assert_int_equal(c->server.workers, 4);
    assert_string_equal(c->server.user, "edgemux");
    assert_string_equal(c->plugins.dir, "/opt/edgemux/plugins");
    assert_string_equal(c->log.level, "debug");
    assert_string_equal(c->log.format, "json");
    assert_string_equal(c->edge.address, "10.0.0.5");
    assert_int_equal(c->edge.port, 8443);
    assert_string_equal(c->edge.path, "/Edge/WS");
    assert_string_equal(c->edge.tls_cert, "/etc/edgemux/edge.pem");
    assert_string_equal(c->edge.tls_key, "/etc/edgemux/edge.key");
    assert_string_equal(c->edge.tls_ca, "/etc/edgemux/ca.pem");
    assert_true(c->edge.tls_client_cert);
    assert_int_equal(c->edge.max_message_size, 4 * 1024 * 1024);
    assert_int_equal(c->edge.auth_timeout, 20000);
    assert_int_equal(c->edge.idle_timeout, 300000);
    assert_int_equal(c->edge.request_timeout, 45000);
    assert_int_equal(c->edge.max_pending, 250);
    assert_int_equal(c->edge.max_queued, 512 * 1024);
    assert_int_equal(c->edge.max_connections, 20000);
    assert_false(c->edge.deflate);
    assert_string_equal(c->platform.path, "/Thingworx/WS2");
    assert_null(c->platform.app_key);
    assert_string_equal(c->platform.app_key_file, "/etc/edgemux/appkey");
    assert_int_equal(c->platform.pipes_per_instance, 8);
    assert_int_equal(c->platform.high_watermark, 128 * 1024);
    assert_int_equal(c->platform.low_watermark, 96 * 1024);
    assert_int_equal(c->platform.ping_interval, 15000);
    assert_int_equal(c->platform.idle_read_timeout, 90000);
    assert_int_equal(c->platform.connect_timeout, 5000);
    assert_int_equal(c->platform.request_timeout, 9500);
    assert_int_equal(c->platform.stall_after, 1000);
    assert_int_equal(c->platform.multipart_pin_wait, 0);
    assert_int_equal(c->platform.all_down_grace, 0);
    assert_int_equal(c->platform.close_spread, 3600000);
    assert_int_equal(c->platform.sndbuf, 1024 * 1024);
    assert_int_equal(c->platform.reconnect_min, 100);
    assert_int_equal(c->platform.reconnect_max, 60000);
    assert_string_equal(c->platform.tls_ca, "/etc/edgemux/platform-ca.pem");
    assert_string_equal(c->platform.tls_cert, "/etc/edgemux/client.pem");
    assert_string_equal(c->platform.tls_key, "/etc/edgemux/client.key");
    assert_false(c->platform.tls_verify);
    assert_string_equal(c->discovery.plugin, "consul");
    assert_int_equal(c->discovery.empty_confirm, 30000);
    assert_non_null(c->discovery.node);
    assert_int_equal(c->discovery.node->kind, EMX_NODE_MAP);
    assert_string_equal(c->transport.plugin, "ws");
    assert_non_null(c->transport.node);
    assert_string_equal(c->admin.listen, "0.0.0.0:9901");
    assert_string_equal(c->admin.agent_listen, "0.0.0.0:9902");
    struct emx_errors e = {0};
    assert_int_equal(emx_config_check_unused(c, &e), 0);
    emx_config_free(c);
}

static void test_cx_aliases(void **state)
{
    (void)state;
    struct emx_config *c = load_file_ok(DATA "cx.yaml");
    assert_string_equal(c->server.name, "cx-migrated");
    assert_int_equal(c->edge.port, 9090);
    assert_string_equal(c->platform.app_key, "00000000-1111-2222-3333-444444444444");
    assert_int_equal(c->platform.pipes_per_instance, 3);
    assert_int_equal(c->platform.high_watermark, 65536);
    assert_int_equal(c->platform.low_watermark, 16384);
    assert_int_equal(c->platform.ping_interval, 20000);
    assert_int_equal(c->platform.idle_read_timeout, 90000);
    assert_int_equal(c->platform.connect_timeout, 7000); /* "-ms": bare ms */
    assert_int_equal(c->platform.request_timeout, 9000);
    assert_int_equal(c->edge.max_pending, 100);
    struct emx_errors e = {0};
    assert_int_equal(emx_config_check_unused(c, &e), 0);
    emx_config_free(c);
}

static void test_sample_conf(void **state)
{
    (void)state;
    struct emx_config *c = load_file_ok(SAMPLE_CONF);
    /* The sample documents the defaults: it must bind exactly to them. */
    assert_defaults_except_name(c);
    assert_string_equal(c->server.name, "edgemux-1");
    emx_config_free(c);
}

static void test_operations_keys(void **state)
{
    (void)state;
    struct emx_config *c =
        load_ok(NAME "edge:\n  trusted_proxies: [127.0.0.1, 10.0.0.0/8, 'fd00::/8']\n"
                     "  max_connections_per_source: 20\n  max_msgs_per_sec: 50\n"
                     "  max_things: 100\n  drain_spread: 30s\n");
    assert_int_equal(c->edge.trusted_proxies.count, 3);
    assert_string_equal(c->edge.trusted_proxies.items[1], "10.0.0.0/8");
    assert_int_equal(c->edge.max_connections_per_source, 20);
    assert_int_equal(c->edge.max_msgs_per_sec, 50);
    assert_int_equal(c->edge.max_things, 100);
    assert_int_equal(c->edge.drain_spread, 30000);
    emx_config_free(c);
    c = load_ok(NAME "edge:\n  trusted_proxies: 127.0.0.1\n");
    assert_int_equal(c->edge.trusted_proxies.count, 1);
    emx_config_free(c);
    expect_error(NAME "edge:\n  trusted_proxies: [10.0.0.1/8]\n",
                 "t.yaml:3: edge.trusted_proxies: '10.0.0.1/8' is not an IP address or CIDR "
                 "block (host bits must be zero)");
    expect_error(NAME "edge:\n  max_things: -1\n",
                 "t.yaml:3: edge.max_things: must be between 0 and 1000000 (got -1)");
    expect_error(NAME "edge:\n  max_connections_per_source: -2\n",
                 "t.yaml:3: edge.max_connections_per_source: must be 0 (unlimited) or more "
                 "(got -2)");
}

static void test_nulls_take_defaults(void **state)
{
    (void)state;
    struct emx_config *c = load_ok(NAME "edge:\n  port: ~\n  tls_cert:\n  path: null\n"
                                        "platform:\n");
    assert_int_equal(c->edge.port, 8080);
    assert_null(c->edge.tls_cert);
    assert_string_equal(c->edge.path, "/Thingworx/WS");
    emx_config_free(c);
    /* A quoted empty string is a value, not "unset". */
    c = load_ok(NAME "admin:\n  listen: ''\n");
    assert_string_equal(c->admin.listen, "");
    emx_config_free(c);
}

static void test_line_numbers(void **state)
{
    (void)state;
    const char *text = "# comment\n\nserver:\n  name: x\n  workers: 2\nedge:\n  port: 1\n";
    struct emx_node *root = NULL;
    struct emx_errors e = {0};
    assert_int_equal(emx_yaml_parse("f.yaml", text, strlen(text), &root, &e), 0);
    assert_string_equal(root->file, "f.yaml");
    struct emx_node *server = emx_node_get(root, "server");
    assert_non_null(server);
    assert_int_equal(server->key_line, 3);
    assert_int_equal(server->kind, EMX_NODE_MAP);
    struct emx_node *w = emx_node_get(server, "workers");
    assert_int_equal(w->key_line, 5);
    assert_int_equal(w->line, 5);
    assert_string_equal(w->value, "2");
    assert_string_equal(w->file, "f.yaml");
    assert_int_equal(emx_node_get(emx_node_get(root, "edge"), "port")->line, 7);
    assert_null(emx_node_get(root, "nope"));
    assert_null(emx_node_get(w, "x"));
    emx_node_free(root);
}

/* ---- errors, each with file:line and key ---- */

static void test_err_unknown_key(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  port: 1\n  colour: red\n", "t.yaml:4: edge.colour: unknown key");
    expect_error(NAME "nonsense: 1\n", "t.yaml:2: nonsense: unknown key");
    /* A nested map under a known key that takes a value. */
    expect_error(NAME "edge:\n  port:\n    a: 1\n",
                 "t.yaml:4: edge.port: expected an integer, got a map");
}

static void test_err_did_you_mean(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  prot: 1\n",
                 "t.yaml:3: edge.prot: unknown key (did you mean 'port'?)");
    expect_error(NAME "platform:\n  high-watermark: 1k\n",
                 "t.yaml:3: platform.high-watermark: unknown key (did you mean "
                 "'high_watermark'?)");
    expect_error(NAME "platfrom:\n  path: /x\n",
                 "t.yaml:2: platfrom: unknown key (did you mean 'platform'?)");
    expect_error(NAME "plattform: {}\n",
                 "t.yaml:2: plattform: unknown key (did you mean 'platform'?)");
}

static void test_err_duplicate(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  port: 1\n  path: /a\n  port: 2\n",
                 "t.yaml:5: edge.port: duplicate key (first set at line 3)");
    expect_error("server:\n  name: a\nserver:\n  name: b\n",
                 "t.yaml:3: server: duplicate key (first set at line 1)");
    /* Large maps take the sorted path. */
    char big[4096];
    size_t pos = (size_t)snprintf(big, sizeof(big), NAME "discovery:\n");
    for (int i = 0; i < 40; i++)
        pos += (size_t)snprintf(big + pos, sizeof(big) - pos, "  k%d: v\n", i);
    snprintf(big + pos, sizeof(big) - pos, "  k7: again\n");
    expect_error(big, "t.yaml:43: discovery.k7: duplicate key (first set at line 10)");
}

static void test_err_wrong_type(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  port: [1, 2]\n",
                 "t.yaml:3: edge.port: expected an integer, got a list");
    expect_error(NAME "edge:\n  port: http\n", "t.yaml:3: edge.port: invalid integer 'http'");
    expect_error(NAME "edge:\n  deflate: maybe\n",
                 "t.yaml:3: edge.deflate: invalid boolean 'maybe' (use true or false)");
    expect_error(NAME "edge: 5\n", "t.yaml:2: edge: expected a map of settings, got a single "
                                   "value");
    expect_error(NAME "log:\n  level: {a: 1}\n",
                 "t.yaml:3: log.level: expected a string, got a map");
}

static void test_err_bad_size(void **state)
{
    (void)state;
    expect_error(NAME "platform:\n  high_watermark: abc\n",
                 "t.yaml:3: platform.high_watermark: invalid size 'abc' (use 64KiB, 1MiB)");
    expect_error(NAME "edge:\n\n  max_queued: -1k\n",
                 "t.yaml:4: edge.max_queued: invalid size '-1k' (use 64KiB, 1MiB)");
    expect_error(NAME "edge:\n  max_queued: 99999999999999999999\n",
                 "t.yaml:3: edge.max_queued: invalid size '99999999999999999999' (use 64KiB, "
                 "1MiB)");
}

static void test_err_bad_duration(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  auth_timeout: 15\n",
                 "t.yaml:3: edge.auth_timeout: invalid duration '15' (a bare number is "
                 "ambiguous: add a unit, e.g. 30s or 250ms)");
    expect_error(NAME "edge:\n  auth_timeout: soon\n",
                 "t.yaml:3: edge.auth_timeout: invalid duration 'soon' (use 250ms, 30s, 5m, 1h)");
    /* Only keys ending in "-ms" take bare milliseconds. */
    expect_error(NAME "cx-server.transport.websockets.connections.pingRate: 30000\n",
                 "t.yaml:2: cx-server.transport.websockets.connections.pingRate: invalid "
                 "duration '30000' (a bare number is ambiguous: add a unit, e.g. 30s or 250ms)");
    /* Bad values are quoted short and without control characters. */
    expect_error(NAME "edge:\n  auth_timeout: \"a\\tb0123456789012345678901234567890123456789\"\n",
                 "t.yaml:3: edge.auth_timeout: invalid duration "
                 "'a?b0123456789012345678901234567890123456...' (use 250ms, 30s, 5m, 1h)");
}

static void test_err_missing_required(void **state)
{
    (void)state;
    expect_error("edge:\n  port: 1\n", "t.yaml:1: server.name: required key is missing");
    expect_error("edge:\n  port: 1\nserver:\n  workers: 2\n",
                 "t.yaml:3: server.name: required key is missing");
    expect_error("server:\n  name:\n", "t.yaml:1: server.name: required key is missing");
}

static void test_err_alias_conflict(void **state)
{
    (void)state;
    expect_error("server:\n  name: a\ncx-server.thing.name: b\n",
                 "t.yaml:3: server.name: set twice: as 'name' (line 2) and as "
                 "'cx-server.thing.name' (line 3); keep one");
    expect_error(NAME "platform:\n  high_watermark: 64k\n"
                      "cx-server.transport.websockets.connections.highWaterMark: 64k\n",
                 "t.yaml:4: platform.high_watermark: set twice: as 'high_watermark' (line 3) and "
                 "as 'cx-server.transport.websockets.connections.highWaterMark' (line 4); keep "
                 "one");
    /* An alias inside the section counts too. */
    expect_error(NAME "edge:\n  port: 1\n  cx-server.protocol.port: 2\n",
                 "t.yaml:4: edge.port: set twice: as 'port' (line 3) and as "
                 "'cx-server.protocol.port' (line 4); keep one");
}

static void test_err_semantic(void **state)
{
    (void)state;
    expect_error(NAME "platform:\n  low_watermark: 64k\n",
                 "t.yaml:3: platform.low_watermark: must be below high_watermark (65536 >= "
                 "65536 bytes)");
    expect_error(NAME "platform:\n  high_watermark: 16k\n",
                 "t.yaml:3: platform.high_watermark: must be above low_watermark (16384 <= "
                 "32768 bytes)");
    expect_error(NAME "platform:\n  pipes_per_instance: 0\n",
                 "t.yaml:3: platform.pipes_per_instance: must be between 1 and 64 (got 0)");
    expect_error(NAME "cx-server.transport.websockets.connections.pipe-count: 65\n",
                 "t.yaml:2: cx-server.transport.websockets.connections.pipe-count: must be "
                 "between 1 and 64 (got 65)");
    expect_error("server:\n  name: a\n  workers: 17\n",
                 "t.yaml:3: server.workers: must be between 1 and 16 (got 17)");
    expect_error(NAME "edge:\n  port: 65536\n",
                 "t.yaml:3: edge.port: must be between 1 and 65535 (got 65536)");
    expect_error(NAME "edge:\n  port: -1\n",
                 "t.yaml:3: edge.port: must be between 1 and 65535 (got -1)");
    expect_error(NAME "edge:\n  max_pending: 0\n",
                 "t.yaml:3: edge.max_pending: must be at least 1 (got 0)");
    expect_error(NAME "edge:\n  path: Thingworx/WS\n",
                 "t.yaml:3: edge.path: must start with '/' (got 'Thingworx/WS')");
    expect_error(NAME "platform:\n  path: ws\n",
                 "t.yaml:3: platform.path: must start with '/' (got 'ws')");
    expect_error(NAME "log:\n  level: loud\n",
                 "t.yaml:3: log.level: invalid level 'loud' (use error, warn, info, debug)");
    expect_error(NAME "log:\n  format: xml\n",
                 "t.yaml:3: log.format: invalid format 'xml' (use text or json)");
    expect_error("server:\n  name: ''\n", "t.yaml:2: server.name: must not be empty");
    expect_error(NAME "platform:\n  reconnect_min: 1m\n",
                 "t.yaml:3: platform.reconnect_min: must not exceed reconnect_max");
    expect_error(NAME "edge:\n  tls_cert: /c.pem\n", "t.yaml:3: edge.tls_cert: needs tls_key too");
}

/* Values that parse but make no sense: each refused at its own line. */
static void test_err_senseless(void **state)
{
    (void)state;
    static const struct {
        const char *section, *key, *value, *msg;
    } cases[] = {
        {"edge", "request_timeout", "0", "must be more than 0"},
        {"edge", "auth_timeout", "0", "must be more than 0"},
        {"edge", "idle_timeout", "0", "must be more than 0"},
        {"edge", "max_message_size", "0", "must be between 1024 and 1073741824 bytes (got 0)"},
        {"edge", "max_message_size", "1000",
         "must be between 1024 and 1073741824 bytes (got 1000)"},
        {"edge", "max_message_size", "2GiB",
         "must be between 1024 and 1073741824 bytes (got 2147483648)"},
        {"platform", "request_timeout", "0", "must be more than 0"},
        {"platform", "connect_timeout", "0", "must be more than 0"},
        {"platform", "idle_read_timeout", "0", "must be more than 0"},
        {"platform", "stall_after", "0", "must be more than 0"},
        {"platform", "reconnect_min", "0", "must be more than 0"},
        {"platform", "ping_interval", "60s", "must be below idle_read_timeout (60000 >= 60000 ms)"},
        {"edge", "max_queued", "0", "must be more than 0"},
        {"edge", "max_pending", "4294967297", "must be at most 1000000 (got 4294967297)"},
        {"platform", "sndbuf", "4GiB", "must be between 0 and 1073741824 bytes (got 4294967296)"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char text[256], msg[256];
        /* Two lines of filler put the key on line 5: the message must name it. */
        snprintf(text, sizeof(text), NAME "# a\n# b\n%s:\n  %s: %s\n", cases[i].section,
                 cases[i].key, cases[i].value);
        snprintf(msg, sizeof(msg), "t.yaml:5: %s.%s: %s", cases[i].section, cases[i].key,
                 cases[i].msg);
        expect_error(text, msg);
    }
    expect_error(NAME "platform:\n  max_connecting: 0\n",
                 "t.yaml:3: platform.max_connecting: must be between 1 and 10000 (got 0)");
    expect_error(NAME "discovery:\n  max_instances: 100001\n",
                 "t.yaml:3: discovery.max_instances: must be between 1 and 100000 (got 100001)");
    /* Both ends of the reconnect delay: max 0 (with min 0) gives two errors. */
    expect_error(NAME "platform:\n  reconnect_min: 0\n  reconnect_max: 0\n",
                 "t.yaml:4: platform.reconnect_max: must be more than 0");
    /* The CX alias is named as written. */
    expect_error(NAME "cx-server.transport.websockets.request.default_timeout-ms: 0\n",
                 "t.yaml:2: cx-server.transport.websockets.request.default_timeout-ms: must be "
                 "more than 0");
    /* Values at the limits are accepted (4KiB: edge.max_preauth_message must fit). */
    const char *ok = NAME "edge:\n  max_message_size: 4KiB\n  request_timeout: 1ms\n"
                          "platform:\n  ping_interval: 59s\n  reconnect_min: 1ms\n";
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    int rc = emx_config_load_string("t.yaml", ok, strlen(ok), &cfg, &e);
    if (rc != 0)
        dump(&e);
    assert_int_equal(rc, 0);
    emx_config_free(cfg);
    emx_errors_free(&e);
}

static void test_err_secret_never_shown(void **state)
{
    (void)state;
    const char *texts[] = {
        NAME "platform:\n  app_key: s3cr3t-key\n  app_key_file: /k\n",
        NAME "platform:\n  app_key: [s3cr3t-key]\n",
        NAME "cx-server.transport.websockets.app-key: s3cr3t-key\nplatform:\n  app_key: "
             "s3cr3t-key\n",
    };
    const char *want[] = {
        "t.yaml:4: platform.app_key_file: set together with app_key; keep one",
        "t.yaml:3: platform.app_key: expected a string, got a list",
        ("t.yaml:4: platform.app_key: set twice: as 'cx-server.transport.websockets.app-key' "
         "(line 2) and as 'app_key' (line 4); keep one"),
    };
    for (size_t i = 0; i < 3; i++) {
        struct emx_errors e = {0};
        struct emx_config *cfg = NULL;
        assert_int_not_equal(emx_config_load_string("t.yaml", texts[i], strlen(texts[i]), &cfg, &e),
                             0);
        for (size_t j = 0; j < e.count; j++)
            assert_null(strstr(e.msgs[j], "s3cr3t"));
        if (!has_msg(&e, want[i]))
            dump(&e);
        assert_true(has_msg(&e, want[i]));
        emx_errors_free(&e);
    }
}

static void test_err_yaml(void **state)
{
    (void)state;
    expect_error(NAME "edge:\n  port: 1\n bad: [\n",
                 "t.yaml:4: YAML syntax error: did not find expected key (while parsing a "
                 "block mapping)");
    expect_error(NAME "edge: {port: 1\n",
                 "t.yaml:3: YAML syntax error: did not find expected ',' or '}' (while "
                 "parsing a flow mapping)");
    expect_error("", "t.yaml:1: empty configuration: expected a map of sections");
    expect_error("# only a comment\n\n", "t.yaml:1: empty configuration: expected a map of "
                                         "sections");
    expect_error("---\n", "t.yaml:1: empty configuration: expected a map of sections");
    expect_error("- a\n- b\n", "t.yaml:1: the top level must be a map of sections, not a list");
    expect_error("\nhello\n",
                 "t.yaml:2: the top level must be a map of sections, not a single value");
    expect_error(NAME "---\nedge: {}\n", "t.yaml:2: only one YAML document is allowed");
    expect_error(NAME "edge: &e {port: 1}\n",
                 "t.yaml:2: YAML anchors (&) are not allowed: a config is data, not a graph");
    expect_error("base: &b x\n" NAME,
                 "t.yaml:1: YAML anchors (&) are not allowed: a config is data, not a graph");
    expect_error(NAME "edge: *e\n",
                 "t.yaml:2: YAML aliases (*) are not allowed: a config is data, not a graph");
    expect_error(NAME "edge:\n  ? [a]\n  : 1\n", "t.yaml:3: edge: keys must be plain strings");
    expect_error(NAME "edge:\n  path: \"/a\\0b\"\n",
                 "t.yaml:3: edge.path: value contains a NUL character");
    expect_error(NAME "\xff\xfe: 1\n", "t.yaml:2: YAML syntax error: invalid leading UTF-8 "
                                       "octet");
    /* Deep nesting is refused, not recursed into. */
    char deep[400];
    memset(deep, '[', 300);
    deep[300] = '\0';
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    assert_int_equal(emx_config_load_string("t.yaml", deep, strlen(deep), &cfg, &e), -EINVAL);
    assert_true(has_msg(&e, "t.yaml:1: nested more than 64 levels deep"));
    emx_errors_free(&e);
}

static void test_err_files(void **state)
{
    (void)state;
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    assert_int_equal(emx_config_load(DATA "does-not-exist.yaml", &cfg, &e), -ENOENT);
    assert_null(cfg);
    assert_true(has_msg(&e, DATA "does-not-exist.yaml: cannot open: No such file or directory"));
    emx_errors_free(&e);

    size_t len = 1024 * 1024 + 1;
    char *big = malloc(len);
    assert_non_null(big);
    memset(big, '#', len);
    assert_int_equal(emx_config_load_string("big.yaml", big, len, &cfg, &e), -EFBIG);
    assert_true(has_msg(&e, "big.yaml: too large (1048577 bytes; the limit is 1 MiB)"));
    emx_errors_free(&e);

    char tmpl[] = "/tmp/emx-config-XXXXXX";
    int fd = mkstemp(tmpl);
    assert_true(fd >= 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(write(fd, big, len), (ssize_t)len);
    close(fd);
    assert_int_equal(emx_config_load(tmpl, &cfg, &e), -EFBIG);
    assert_int_equal(e.count, 1);
    assert_non_null(strstr(e.msgs[0], ": too large (over 1 MiB)"));
    emx_errors_free(&e);
    unlink(tmpl);
    free(big);
}

static void test_err_many(void **state)
{
    (void)state;
    /* Every error is reported at once, in file order within a section. */
    const char *text = "server:\n  workers: 0\nedge:\n  port: x\n  prot: 1\nplatform:\n"
                       "  sndbuf: 1q\n";
    struct emx_errors e = {0};
    struct emx_config *cfg = NULL;
    assert_int_equal(emx_config_load_string("t.yaml", text, strlen(text), &cfg, &e), -EINVAL);
    assert_true(has_msg(&e, "t.yaml:1: server.name: required key is missing"));
    assert_true(has_msg(&e, "t.yaml:2: server.workers: must be between 1 and 16 (got 0)"));
    assert_true(has_msg(&e, "t.yaml:4: edge.port: invalid integer 'x'"));
    assert_true(has_msg(&e, "t.yaml:5: edge.prot: unknown key (did you mean 'port'?)"));
    assert_true(has_msg(&e, "t.yaml:7: platform.sndbuf: invalid size '1q' (use 64KiB, 1MiB)"));
    emx_errors_free(&e);

    /* A flood of errors is capped, and the rest counted. */
    char *flood = malloc(64 * 1000);
    size_t pos = (size_t)snprintf(flood, 64, NAME);
    for (int i = 0; i < 1000; i++)
        pos += (size_t)snprintf(flood + pos, 64, "x%d: 1\n", i);
    assert_int_equal(emx_config_load_string("t.yaml", flood, pos, &cfg, &e), -EINVAL);
    assert_int_equal(e.count, EMX_ERRORS_MAX);
    assert_int_equal(e.dropped, 1000 - EMX_ERRORS_MAX);
    emx_errors_free(&e);
    free(flood);
}

/* ---- plugins ---- */

struct fake_plugin {
    const char *connection;
    const char *base_path;
    const char *token;
    int64_t retries;
    uint64_t timeout;
    uint64_t session;
    bool watch;
    uint64_t buf;
    struct emx_strlist hosts;
    struct emx_strlist tags;
};

static const struct emx_option fake_options[] = {
    {"connection", "cx-server.discovery.connectionString", EMX_OPT_STRING, NULL, true,
     offsetof(struct fake_plugin, connection), "where the registry is"},
    {"base_path", "cx-server.discovery.basePath", EMX_OPT_STRING, "/services", false,
     offsetof(struct fake_plugin, base_path), "registry path"},
    {"token", NULL, EMX_OPT_SECRET, NULL, false, offsetof(struct fake_plugin, token), "secret"},
    {"retries", NULL, EMX_OPT_INT, "3", false, offsetof(struct fake_plugin, retries), ""},
    {"timeout", "timeout-ms", EMX_OPT_DURATION, "2s", false, offsetof(struct fake_plugin, timeout),
     ""},
    {"session_timeout", "cx-server.discovery.session-timeout-ms", EMX_OPT_DURATION, "30s", false,
     offsetof(struct fake_plugin, session), ""},
    {"watch", NULL, EMX_OPT_BOOL, "true", false, offsetof(struct fake_plugin, watch), ""},
    {"buf", NULL, EMX_OPT_SIZE, "4k", false, offsetof(struct fake_plugin, buf), ""},
    {"hosts", NULL, EMX_OPT_STRING_LIST, NULL, false, offsetof(struct fake_plugin, hosts), ""},
    {"tags", NULL, EMX_OPT_STRING_LIST, "default", false, offsetof(struct fake_plugin, tags), ""},
    EMX_OPTION_END,
};

static void test_plugin_bind(void **state)
{
    (void)state;
    struct emx_config *c = load_ok(NAME "discovery:\n  plugin: zookeeper\n  empty_confirm: 5s\n"
                                        "  connection: zk1:2181\n  timeout-ms: 1500\n"
                                        "  hosts: [a, b, c]\n  token: t0k\n  watch: no\n"
                                        "cx-server.discovery.basePath: /services/x\n"
                                        "cx-server.discovery.session-timeout-ms: 4000\n");
    assert_string_equal(c->discovery.plugin, "zookeeper");
    assert_int_equal(c->discovery.empty_confirm, 5000);
    struct fake_plugin p;
    memset(&p, 0, sizeof(p));
    struct emx_errors e = {0};
    assert_int_equal(emx_config_bind_plugin(c, "discovery", fake_options, &p, &e), 0);
    assert_int_equal(emx_config_check_unused(c, &e), 0);
    assert_int_equal(e.count, 0);
    assert_string_equal(p.connection, "zk1:2181");
    assert_string_equal(p.base_path, "/services/x");
    assert_string_equal(p.token, "t0k");
    assert_int_equal(p.retries, 3);
    assert_int_equal(p.timeout, 1500);
    assert_int_equal(p.session, 4000);
    assert_false(p.watch);
    assert_int_equal(p.buf, 4096);
    assert_int_equal(p.hosts.count, 3);
    assert_string_equal(p.hosts.items[0], "a");
    assert_string_equal(p.hosts.items[2], "c");
    assert_int_equal(p.tags.count, 1);
    assert_string_equal(p.tags.items[0], "default");
    /* Binding again (a reload, a second instance) gives the same answer. */
    struct fake_plugin q;
    memset(&q, 0, sizeof(q));
    assert_int_equal(emx_config_bind_plugin(c, "discovery", fake_options, &q, &e), 0);
    assert_ptr_equal(q.hosts.items, p.hosts.items);
    emx_config_free(c);

    /* A single scalar is a one-item list; [] is empty. */
    c = load_ok(NAME "transport:\n  connection: x\n  hosts: one\n  tags: []\n");
    memset(&p, 0, sizeof(p));
    assert_int_equal(emx_config_bind_plugin(c, "transport", fake_options, &p, &e), 0);
    assert_int_equal(p.hosts.count, 1);
    assert_string_equal(p.hosts.items[0], "one");
    assert_int_equal(p.tags.count, 0);
    assert_null(p.tags.items);
    assert_ptr_equal(c->transport.node, emx_node_get(c->root, "transport"));
    emx_config_free(c);
}

/* Load, bind the fake plugin to discovery:, check unused; expect msg. */
static void expect_plugin_error(const char *text, const char *msg)
{
    struct emx_config *c = load_ok(text);
    struct fake_plugin p;
    memset(&p, 0, sizeof(p));
    struct emx_errors e = {0};
    int rc = emx_config_bind_plugin(c, "discovery", fake_options, &p, &e);
    rc |= emx_config_check_unused(c, &e);
    if (!has_msg(&e, msg)) {
        fprintf(stderr, "expected: %s\ngot:\n", msg);
        dump(&e);
    }
    assert_int_not_equal(rc, 0);
    assert_true(has_msg(&e, msg));
    for (size_t i = 0; i < e.count; i++)
        assert_null(strstr(e.msgs[i], "s3cr3t"));
    emx_errors_free(&e);
    emx_config_free(c);
}

static void test_plugin_errors(void **state)
{
    (void)state;
    expect_plugin_error(NAME "discovery:\n  connection: x\n  colour: red\n",
                        "t.yaml:4: discovery.colour: unknown key");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  retires: 2\n",
                        "t.yaml:4: discovery.retires: unknown key (did you mean 'retries'?)");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  plugn: consul\n",
                        "t.yaml:4: discovery.plugn: unknown key (did you mean 'plugin'?)");
    expect_plugin_error(NAME "discovery:\n  plugin: zk\n",
                        "t.yaml:2: discovery.connection: required key is missing");
    expect_plugin_error(NAME, "t.yaml:1: discovery.connection: required key is missing");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  buf: lots\n",
                        "t.yaml:4: discovery.buf: invalid size 'lots' (use 64KiB, 1MiB)");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  timeout: 1500\n",
                        "t.yaml:4: discovery.timeout: invalid duration '1500' (a bare number "
                        "is ambiguous: add a unit, e.g. 30s or 250ms)");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  hosts: {a: b}\n",
                        "t.yaml:4: discovery.hosts: expected a list of strings, got a map");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  hosts: [a, [b]]\n",
                        "t.yaml:4: discovery.hosts: list items must be strings, got a list");
    expect_plugin_error(NAME "discovery:\n  connection: x\n  token: [s3cr3t]\n",
                        "t.yaml:4: discovery.token: expected a string, got a list");
    expect_plugin_error(NAME "discovery:\n  connection: x\n"
                             "cx-server.discovery.connectionString: y\n",
                        "t.yaml:4: discovery.connection: set twice: as 'connection' (line 3) "
                        "and as 'cx-server.discovery.connectionString' (line 4); keep one");
    /* Top-level dotted keys nobody declared, with a near miss. */
    expect_plugin_error(NAME "discovery:\n  connection: x\n"
                             "cx-server.discovery.basepath: /a\n",
                        "t.yaml:4: cx-server.discovery.basepath: unknown key (did you mean "
                        "'cx-server.discovery.basePath'?)");
    expect_plugin_error(NAME "discovery:\n  connection: x\ncx-server.other: 1\n",
                        "t.yaml:4: cx-server.other: unknown key");
    /* A transport: key is unknown when only discovery bound a plugin. */
    expect_plugin_error(NAME "discovery:\n  connection: x\ntransport:\n  retries: 1\n",
                        "t.yaml:5: transport.retries: unknown key");
}

static void test_options_bind_direct(void **state)
{
    (void)state;
    struct fake_plugin p;
    struct emx_errors e = {0};
    /* No map: defaults only, and the required key is reported. */
    memset(&p, 0xff, sizeof(p));
    assert_int_equal(emx_options_bind(fake_options, NULL, "x", NULL, &p, &e), 1);
    assert_true(has_msg(&e, "<config>: x.connection: required key is missing"));
    assert_string_equal(p.base_path, "/services");
    assert_null(p.token);
    assert_int_equal(p.hosts.count, 0);
    emx_errors_free(&e);

    const char *text = "connection: c\ntoken: t\ncx-server.discovery.basePath: /b\n";
    struct emx_node *root = NULL;
    assert_int_equal(emx_yaml_parse("p.yaml", text, strlen(text), &root, &e), 0);
    memset(&p, 0, sizeof(p));
    static const char *const skip[] = {"token", NULL};
    assert_int_equal(emx_options_bind(fake_options, root, "", skip, &p, &e), 0);
    assert_string_equal(p.connection, "c");
    assert_null(p.token);
    assert_false(emx_node_get(root, "token")->used);
    assert_true(emx_node_get(root, "connection")->used);
    assert_int_equal(emx_options_bind_aliases(fake_options, root, &p, &e), 0);
    assert_string_equal(p.base_path, "/b");
    emx_node_free(root);

    /* A bad default in a plugin's table is the plugin's bug: say so. */
    static const struct emx_option bad_def[] = {
        {"n", NULL, EMX_OPT_SIZE, "huge", false, 0, ""},
        EMX_OPTION_END,
    };
    uint64_t v;
    assert_int_equal(emx_options_bind(bad_def, NULL, "s", NULL, &v, &e), 1);
    assert_true(has_msg(&e, "<config>: s.n: bad default in the option table: invalid size "
                            "'huge' (use 64KiB, 1MiB)"));
    emx_errors_free(&e);
}

/* ---- allocation failures ---- */

static void test_alloc_failures(void **state)
{
    (void)state;
    FILE *f = fopen(DATA "full.yaml", "rb");
    assert_non_null(f);
    char text[8192];
    size_t len = fread(text, 1, sizeof(text), f);
    fclose(f);
    const char *plugin_text = NAME "discovery:\n  connection: x\n  hosts: [a, b]\n";
    unsigned long n;
    bool ok = false;
    for (n = 1; n < 5000 && !ok; n++) {
        struct emx_errors e = {0};
        struct emx_config *cfg = NULL;
        emx_alloc_fail_at(n);
        int rc = emx_config_load_string("full.yaml", text, len, &cfg, &e);
        emx_alloc_fail_at(0);
        if (rc == 0) {
            ok = true;
            emx_config_free(cfg);
        } else {
            assert_int_equal(rc, -ENOMEM);
            assert_null(cfg);
        }
        emx_errors_free(&e);
    }
    assert_true(ok);
    assert_true(n > 20); /* the loop really went through the allocations */

    /* The same for binding a plugin and checking unused keys, with an
     * error to report. */
    ok = false;
    for (n = 1; n < 5000 && !ok; n++) {
        struct emx_errors e = {0};
        struct emx_config *cfg = NULL;
        emx_alloc_fail_at(n);
        int rc = emx_config_load_string("p.yaml", plugin_text, strlen(plugin_text), &cfg, &e);
        if (rc == 0) {
            struct fake_plugin p;
            memset(&p, 0, sizeof(p));
            rc = emx_config_bind_plugin(cfg, "discovery", fake_options, &p, &e);
            if (rc == 0)
                rc = emx_config_check_unused(cfg, &e);
            emx_config_free(cfg);
        }
        emx_alloc_fail_at(0);
        ok = rc == 0;
        if (!ok)
            assert_int_equal(rc, -ENOMEM);
        emx_errors_free(&e);
    }
    assert_true(ok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_size),
        cmocka_unit_test(test_duration),
        cmocka_unit_test(test_bool),
        cmocka_unit_test(test_minimal),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_cx_aliases),
        cmocka_unit_test(test_sample_conf),
        cmocka_unit_test(test_nulls_take_defaults),
        cmocka_unit_test(test_operations_keys),
        cmocka_unit_test(test_line_numbers),
        cmocka_unit_test(test_err_unknown_key),
        cmocka_unit_test(test_err_did_you_mean),
        cmocka_unit_test(test_err_duplicate),
        cmocka_unit_test(test_err_wrong_type),
        cmocka_unit_test(test_err_bad_size),
        cmocka_unit_test(test_err_bad_duration),
        cmocka_unit_test(test_err_missing_required),
        cmocka_unit_test(test_err_alias_conflict),
        cmocka_unit_test(test_err_semantic),
        cmocka_unit_test(test_err_senseless),
        cmocka_unit_test(test_err_secret_never_shown),
        cmocka_unit_test(test_err_yaml),
        cmocka_unit_test(test_err_files),
        cmocka_unit_test(test_err_many),
        cmocka_unit_test(test_plugin_bind),
        cmocka_unit_test(test_plugin_errors),
        cmocka_unit_test(test_options_bind_direct),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
