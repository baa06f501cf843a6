/* Admin API formatting over a real router (no sockets): Prometheus text,
 * instances and edges JSON; and the admin request parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "admin.h"
#include "ops.h"
#include "router.h"

static int io_send(void *ctx, struct emx_edge *e, const uint8_t *b, size_t n)
{
    (void)ctx, (void)e, (void)b, (void)n;
    return 0;
}
static void io_close(void *ctx, struct emx_edge *e, uint16_t c, const char *r)
{
    (void)ctx, (void)e, (void)c, (void)r;
}
static void io_pause(void *ctx, struct emx_edge *e, bool p)
{
    (void)ctx, (void)e, (void)p;
}
static int io_psend(void *ctx, struct emx_pipe *p, const uint8_t *b, size_t n)
{
    (void)ctx, (void)p, (void)b, (void)n;
    return 0;
}
static void io_pclose(void *ctx, struct emx_pipe *p, const char *r)
{
    (void)ctx, (void)p, (void)r;
}
static void io_inst(void *ctx, struct emx_instance *i)
{
    (void)ctx, (void)i;
}

static struct emx_router *router(void)
{
    struct emx_router_config cfg = {.pipes_per_instance = 2,
                                    .high_watermark = 65536,
                                    .low_watermark = 32768,
                                    .request_timeout = 8000,
                                    .edge_request_timeout = 8000,
                                    .auth_timeout = 15000,
                                    .max_message_size = 1 << 20,
                                    .max_pending = 10,
                                    .app_key = "secret-app-key-xyz"};
    struct emx_router_io io = {.edge_send = io_send,
                               .edge_close = io_close,
                               .edge_pause = io_pause,
                               .pipe_send = io_psend,
                               .pipe_close = io_pclose,
                               .instance_added = io_inst,
                               .instance_removed = io_inst};
    struct emx_router *r = emx_router_new(&cfg, &io, 1000);
    assert_non_null(r);
    struct emx_instance_info set[] = {
        {.id = "p\"1", .host = "10.0.0.1", .port = 8443, .tls = true, .weight = 3, .priority = 1},
    };
    emx_router_discovery_update(r, set, 1, 1000);
    return r;
}

static void metrics_format(void **state)
{
    (void)state;
    struct emx_router *r = router();
    struct emx_edge *e = emx_router_edge_open(r, (void *)1, 1000);
    assert_non_null(e);
    struct emx_server_counters c = {.reloads_ok = 2};
    c.refused[EMX_REFUSE_PER_SOURCE] = 5;
    struct emx_ops_view v = {
        .counters = &c, .discovery_plugin = "static", .ready = false, .start_ms = 0};
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_ops_metrics(&b, r, &v, 3500);
    assert_false(b.failed);
    const char *t = b.data;
    assert_non_null(strstr(t, "# TYPE emx_edges_connected gauge\nemx_edges_connected 1\n"));
    assert_non_null(
        strstr(t, "emx_edges_refused_total{reason=\"max_connections_per_source\"} 5\n"));
    assert_non_null(strstr(t, "emx_reloads_total{result=\"ok\"} 2\n"));
    assert_non_null(strstr(t, "emx_answers_total{reason=\"no_instance\"} 0\n"));
    assert_non_null(strstr(t, "emx_answers_total{reason=\"rate_limited\"} 0\n"));
    assert_non_null(strstr(t, "emx_pipes{instance=\"p\\\"1\",state=\"down\"} 2\n"));
    assert_non_null(strstr(t, "emx_discovery_last_good_age_seconds{plugin=\"static\"} 2.500\n"));
    assert_non_null(strstr(t, "emx_request_latency_seconds_bucket{le=\"0.001\"} 0\n"));
    assert_non_null(strstr(t, "emx_request_latency_seconds_bucket{le=\"+Inf\"} 0\n"));
    assert_non_null(strstr(t, "# TYPE emx_request_latency_seconds histogram\n"));
    assert_non_null(strstr(t, "emx_request_latency_seconds_bucket{le=\"16.384\"} 0\n"));
    assert_non_null(strstr(t, "emx_request_latency_seconds_sum 0.000\n"));
    assert_non_null(strstr(t, "emx_uptime_seconds 3\n"));
    assert_null(strstr(t, "secret-app-key-xyz"));
    /* every counter family's samples end in _total */
    for (const char *p = strstr(t, "# TYPE "); p; p = strstr(p + 1, "# TYPE ")) {
        char name[128], kind[32];
        assert_int_equal(sscanf(p, "# TYPE %127s %31s", name, kind), 2);
        if (strcmp(kind, "counter") == 0)
            assert_non_null(strstr(name, "_total"));
    }
    emx_textbuf_free(&b);
    emx_router_free(r);
}

static void instances_and_edges_json(void **state)
{
    (void)state;
    struct emx_router *r = router();
    struct emx_edge *e = emx_router_edge_open(r, (void *)1, 1000);
    snprintf(e->addr, sizeof(e->addr), "203.0.113.7");
    snprintf(e->peer, sizeof(e->peer), "127.0.0.1:4000");
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_ops_instances_json(&b, r, 2000);
    assert_string_equal(
        b.data,
        "{\"instances\":[{\"id\":\"p\\\"1\",\"host\":\"10.0.0.1\",\"port\":8443,\"tls\":true,"
        "\"weight\":3,\"priority\":1,\"state\":\"active\",\"maintenance\":false,\"eligible\":false,"
        "\"pending\":0,\"requests\":0,\"pipes_up\":0,\"pipes\":["
        "{\"index\":0,\"state\":\"down\",\"queued\":0,\"writable\":false,\"msgs_out\":0,"
        "\"msgs_in\":0,\"bytes_out\":0,\"bytes_in\":0},"
        "{\"index\":1,\"state\":\"down\",\"queued\":0,\"writable\":false,\"msgs_out\":0,"
        "\"msgs_in\":0,\"bytes_out\":0,\"bytes_in\":0}]}]}\n");
    emx_textbuf_free(&b);
    emx_textbuf_init(&b, 0);
    emx_ops_edges_json(&b, r, NULL, e->id, 10, 3000);
    assert_non_null(strstr(b.data, "\"address\":\"203.0.113.7\",\"peer\":\"127.0.0.1:4000\""));
    assert_non_null(strstr(b.data, "\"state\":\"new\""));
    assert_non_null(strstr(b.data, "\"count\":1,\"truncated\":false"));
    emx_textbuf_free(&b);
    emx_textbuf_init(&b, 0);
    emx_ops_edges_json(&b, r, "NoSuchThing", 0, 10, 3000);
    assert_string_equal(b.data, "{\"edges\":[],\"count\":0,\"truncated\":false}\n");
    emx_textbuf_free(&b);
    emx_router_edge_open(r, (void *)2, 1000);
    emx_textbuf_init(&b, 0);
    emx_ops_edges_json(&b, r, NULL, 0, 1, 3000);
    assert_non_null(strstr(b.data, "\"count\":1,\"truncated\":true"));
    emx_textbuf_free(&b);
    emx_router_free(r);
}

static void admin_request_parsing(void **state)
{
    (void)state;
    struct emx_admin_request q;
#define P(s) emx_admin_parse_request(s, strlen(s), &q)
    assert_int_equal(P("GET /edges?thing=Pump%20B HTTP/1.1\r\nHost: x\r\n\r\n"), 0);
    assert_string_equal(q.method, "GET");
    assert_string_equal(q.path, "/edges");
    assert_string_equal(q.query, "thing=Pump%20B");
    assert_int_equal(P("POST /instances/a%2Fb/maintenance HTTP/1.0\n\n"), 0);
    assert_string_equal(q.path, "/instances/a/b/maintenance");
    assert_int_equal(P("GET /x HTTP/2.0\r\n\r\n"), 505);
    assert_int_equal(P("GET x HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("get /x HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("GET /x\r\n\r\n"), 400);
    assert_int_equal(P("GET  /x HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("GET /a%0a HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("GET /a%zz HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("GET /a% HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("GET /a\x01 HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("TOOLONGMETHOD /a HTTP/1.1\r\n\r\n"), 400);
    assert_int_equal(P("no newline"), 400);
    char big[EMX_ADMIN_TARGET_MAX + 64];
    memcpy(big, "GET /", 5);
    memset(big + 5, 'a', EMX_ADMIN_TARGET_MAX);
    memcpy(big + 5 + EMX_ADMIN_TARGET_MAX, " HTTP/1.1\r\n\r\n", 14);
    assert_int_equal(P(big), 414);
#undef P
    char v[16];
    assert_true(emx_admin_query_get("a=1&thing=Pump+B%21&x", "thing", v, sizeof(v)));
    assert_string_equal(v, "Pump B!");
    assert_true(emx_admin_query_get("a=1&x", "x", v, sizeof(v)));
    assert_string_equal(v, "");
    assert_false(emx_admin_query_get("a=1", "b", v, sizeof(v)));
    assert_false(emx_admin_query_get("a=%00", "a", v, sizeof(v)));
    assert_false(emx_admin_query_get("a=0123456789abcdef0", "a", v, sizeof(v)));
    assert_false(emx_admin_query_get("thing2=x", "thing", v, sizeof(v)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(metrics_format),
        cmocka_unit_test(instances_and_edges_json),
        cmocka_unit_test(admin_request_parsing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
