/* The status page over a real router (no sockets): the HTML escaping helper,
 * the ring of recent events, what emx_status_track notices, and the page's
 * numbers and escaping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"
#include "status.h"
#include "textbuf.h"
#include "tunnel_relay.h"

static char *html_of(const char *s)
{
    static char out[512];
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_textbuf_html(&b, s);
    assert_false(b.failed);
    snprintf(out, sizeof(out), "%s", b.data ? b.data : "");
    emx_textbuf_free(&b);
    return out;
}

static void html_escaping(void **state)
{
    (void)state;
    assert_string_equal(html_of("<img src=x onerror=alert(1)>"),
                        "&lt;img src=x onerror=alert(1)&gt;");
    assert_string_equal(html_of("a&b \"q\" 'q'"), "a&amp;b &quot;q&quot; &#39;q&#39;");
    assert_string_equal(html_of("</td><script>x</script>"),
                        "&lt;/td&gt;&lt;script&gt;x&lt;/script&gt;");
    assert_string_equal(html_of("&lt;"), "&amp;lt;"); /* never decoded */
    assert_string_equal(html_of("tab\there\nnl\x01\x1b\x7f!"), "tab\there\nnl!");
    assert_string_equal(html_of("caf\xc3\xa9 \xe2\x9c\x93"), "caf\xc3\xa9 \xe2\x9c\x93");
    assert_string_equal(html_of("bad \xff\xc3 end \xed\xa0\x80"), "bad ?? end ???");
    assert_string_equal(html_of(NULL), "");
    assert_string_equal(html_of(""), "");
}

static void events_ring_is_bounded_and_merges_repeats(void **state)
{
    (void)state;
    struct emx_status st;
    emx_status_init(&st);
    assert_null(emx_status_event_at(&st, 0));
    emx_status_event(&st, EMX_EV_DISCOVERY, 1, 10, 1000, "failed: %s", "boom");
    emx_status_event(&st, EMX_EV_DISCOVERY, 1, 20, 2000, "failed: %s", "boom");
    emx_status_event(&st, EMX_EV_RELOAD, 1, 30, 3000, "failed: boom"); /* other kind */
    assert_int_equal(st.nevents, 2);
    const struct emx_event *e = emx_status_event_at(&st, 1);
    assert_string_equal(e->text, "failed: boom");
    assert_int_equal(e->count, 2);
    assert_int_equal(e->first_wall_ms, 1000);
    assert_int_equal(e->wall_ms, 2000);
    assert_int_equal(emx_status_event_at(&st, 0)->kind, EMX_EV_RELOAD);
    for (int i = 0; i < 100; i++)
        emx_status_event(&st, EMX_EV_INSTANCE, 1, 100 + (uint64_t)i, 0, "event %d", i);
    assert_int_equal(st.nevents, EMX_EVENTS_MAX);
    assert_int_equal(st.events_total, 102);
    assert_string_equal(emx_status_event_at(&st, 0)->text, "event 99");
    assert_string_equal(emx_status_event_at(&st, EMX_EVENTS_MAX - 1)->text, "event 36");
    assert_null(emx_status_event_at(&st, EMX_EVENTS_MAX));
    char big[600];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    emx_status_event(&st, EMX_EV_RELOAD, 1, 1, 0, "%s", big);
    const char *t = emx_status_event_at(&st, 0)->text;
    assert_int_equal(strlen(t), EMX_EVENT_TEXT_MAX - 1);
    assert_string_equal(t + strlen(t) - 3, "...");
    emx_status_free(&st);
}

/* ---- a router to look at ---- */

struct fx {
    struct emx_router *r;
    struct emx_pipe *auth_pipe; /* the last pipe an AUTH went out on */
    uint32_t auth_rid, auth_eid;
};

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
    struct fx *f = ctx;
    struct emx_ao_header h;
    size_t off;
    if (emx_ao_header_parse(b, n, &h, &off) == 0 && h.code == EMX_AO_AUTH) {
        f->auth_pipe = p;
        f->auth_rid = h.request_id;
        f->auth_eid = h.endpoint_id;
    }
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

static struct emx_router *make_router_w(struct fx *f, unsigned worker)
{
    struct emx_router_config cfg = {.pipes_per_instance = 2,
                                    .worker = worker,
                                    .high_watermark = 65536,
                                    .low_watermark = 32768,
                                    .request_timeout = 8000,
                                    .edge_request_timeout = 8000,
                                    .auth_timeout = 15000,
                                    .all_down_grace = 3000,
                                    .empty_confirm = 1000,
                                    .max_message_size = 1 << 20,
                                    .max_pending = 10,
                                    .app_key = "secret-app-key-xyz"};
    struct emx_router_io io = {.ctx = f,
                               .edge_send = io_send,
                               .edge_close = io_close,
                               .edge_pause = io_pause,
                               .pipe_send = io_psend,
                               .pipe_close = io_pclose,
                               .instance_added = io_inst,
                               .instance_removed = io_inst};
    f->r = emx_router_new(&cfg, &io, 1000);
    assert_non_null(f->r);
    return f->r;
}

static struct emx_router *make_router(struct fx *f)
{
    return make_router_w(f, 0);
}

static void pipe_up(struct fx *f, struct emx_pipe *p, uint64_t now)
{
    f->auth_pipe = NULL;
    emx_router_pipe_opened(f->r, p, now);
    assert_ptr_equal(f->auth_pipe, p);
    uint8_t buf[64];
    size_t n = emx_ao_build_response(buf, sizeof(buf), EMX_AO_SUCCESS, f->auth_rid, f->auth_eid,
                                     0x0BADC0DE, NULL);
    emx_router_pipe_message(f->r, p, buf, n, now);
    assert_int_equal(p->state, EMX_PIPE_UP);
}

static bool has_event(const struct emx_status *st, enum emx_event_kind kind, const char *text)
{
    const struct emx_event *e;
    for (size_t i = 0; (e = emx_status_event_at(st, i)) != NULL; i++)
        if (e->kind == kind && strstr(e->text, text))
            return true;
    return false;
}

/* Many instances in one change: the event lists as many ids as fit and
 * ends in ", ..." inside its bound (it once lost its NUL there). */
static void track_lists_many_instances_within_bounds(void **state)
{
    (void)state;
    struct fx f = {0};
    struct emx_router *r = make_router(&f);
    struct emx_status st;
    emx_status_init(&st);
    struct emx_instance_info set[20];
    char ids[20][32];
    for (int i = 0; i < 20; i++) {
        snprintf(ids[i], sizeof(ids[i]), "platform-instance-%02d", i);
        set[i] = (struct emx_instance_info){
            .id = ids[i], .host = "10.0.0.1", .port = (uint16_t)(8000 + i), .weight = 1};
    }
    emx_router_discovery_update(r, set, 20, 1000);
    emx_status_track(&st, r, 1000, 5000);
    const struct emx_event *e = emx_status_event_at(&st, 0);
    assert_non_null(e);
    size_t n = strnlen(e->text, sizeof(e->text));
    assert_true(n < sizeof(e->text));
    assert_non_null(strstr(e->text, "20 instances added: platform-instance-00, "));
    assert_non_null(strstr(e->text, ", ..."));
    emx_status_free(&st);
    emx_router_free(r);
}

static void track_notices_changes(void **state)
{
    (void)state;
    struct fx f = {0};
    struct emx_router *r = make_router(&f);
    struct emx_status st;
    emx_status_init(&st);
    struct emx_instance_info set[] = {
        {.id = "a", .host = "10.0.0.1", .port = 8443, .weight = 1},
        {.id = "b", .host = "10.0.0.2", .port = 8443, .weight = 1},
    };
    emx_router_discovery_update(r, set, 2, 1000);
    emx_status_track(&st, r, 1000, 5000);
    assert_true(has_event(&st, EMX_EV_DISCOVERY, "2 instances added: a, b"));
    assert_int_equal(st.nevents, 1);

    struct emx_instance *a = emx_router_instance_find(r, "a");
    pipe_up(&f, &a->pipes[0], 1100);
    emx_status_track(&st, r, 1100, 5100);
    assert_true(has_event(&st, EMX_EV_INSTANCE, "instance a up"));
    assert_true(has_event(&st, EMX_EV_ALL_DOWN, "a platform pipe is connected"));
    size_t before = st.nevents;
    emx_status_track(&st, r, 1150, 5150); /* nothing changed: nothing new */
    assert_int_equal(st.nevents, before);

    /* requests per second: sampled once a second */
    double rate = -1;
    assert_false(emx_status_rate(&st, a, &rate));
    a->requests += 30;
    emx_status_track(&st, r, 2000, 6000);
    assert_true(emx_status_rate(&st, a, &rate));
    assert_true(rate > 29.9 && rate < 30.1); /* 30 in the second from 1000 */
    a->requests += 5;
    emx_status_track(&st, r, 2500, 6500); /* half a second: no new sample */
    assert_true(emx_status_rate(&st, a, &rate));
    assert_true(rate > 29.9 && rate < 30.1);

    emx_router_pipe_closed(r, &a->pipes[0], 3000);
    emx_status_track(&st, r, 3000, 7000);
    assert_true(has_event(&st, EMX_EV_INSTANCE, "instance a down"));
    assert_true(has_event(&st, EMX_EV_ALL_DOWN, "no platform pipe connected"));

    /* b leaves discovery: draining, and removed once idle */
    emx_router_discovery_update(r, set, 1, 4000);
    emx_status_track(&st, r, 4000, 8000);
    bool leaving = has_event(&st, EMX_EV_DISCOVERY, "instance b left discovery");
    bool removed = has_event(&st, EMX_EV_DISCOVERY, "instance b drained and removed");
    assert_true(leaving || removed);
    emx_router_tick(r, 10000);
    emx_status_track(&st, r, 10000, 14000);
    assert_true(has_event(&st, EMX_EV_DISCOVERY, "instance b drained and removed"));
    assert_null(emx_router_instance_find(r, "b"));
    emx_status_free(&st);
    emx_router_free(r);
}

static const char *fake_error(void *ctx, const struct emx_pipe *p, uint64_t *at)
{
    (void)ctx;
    if (p->index != 1)
        return NULL;
    *at = 1500;
    return "1006 <b>closed</b> by \"peer\"";
}

static void page_numbers_and_escaping(void **state)
{
    (void)state;
    struct fx f = {0};
    struct emx_router *r = make_router(&f);
    struct emx_instance_info set[] = {
        {.id = "<script>alert(1)</script>", .host = "h\"ost", .port = 8443, .weight = 1},
        {.id = "plain", .host = "10.0.0.2", .port = 8080, .weight = 1},
    };
    emx_router_discovery_update(r, set, 2, 1000);
    struct emx_instance *plain = emx_router_instance_find(r, "plain");
    pipe_up(&f, &plain->pipes[0], 1000);
    pipe_up(&f, &plain->pipes[1], 1000);
    plain->requests = 42;
    struct emx_edge *e = emx_router_edge_open(r, (void *)1, 1000);
    assert_non_null(e);
    snprintf(e->addr, sizeof(e->addr), "<i>10.1.1.1</i>");
    struct emx_status st;
    emx_status_init(&st);
    emx_status_track(&st, r, 1000, 0);
    emx_status_event(&st, EMX_EV_RELOAD, 1, 1000, 0, "reload refused: '%s'", "<svg onload=x>");

    struct emx_server_counters c = {.reloads_ok = 3, .reloads_failed = 1};
    struct emx_relays relays = {.nopen = {2, 1}};
    relays.st.bytes_to_owner = 123456;
    relays.st.bytes_to_peer = 654321;
    relays.st.refused[EMX_RELAY_REFUSE_SOURCE_LIMIT] = 4;
    relays.st.refused[EMX_RELAY_REFUSE_UNKNOWN_TID] = 1;
    struct emx_ops_view ov = {.counters = &c,
                              .discovery_plugin = "static",
                              .ready = true,
                              .agent_weight = 100,
                              .start_ms = 0,
                              .relays = &relays};
    struct emx_status_source src[] = {{.addr = "<u>x</u>", .n = 7}};
    struct emx_status_view v = {.ops = &ov,
                                .server_name = "emx<1>",
                                .version = "9.9.9",
                                .workers = 1,
                                .max_pending = 10,
                                .wall_ms = 0,
                                .sources = src,
                                .nsources = 1,
                                .sources_total = 1,
                                .pipe_error = fake_error};
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_status_html(&b, r, &st, &v, 61000);
    assert_false(b.failed);
    const char *t = b.data;
    /* the markup that came from outside is text */
    assert_null(strstr(t, "<script>alert"));
    assert_non_null(strstr(t, "&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_null(strstr(t, "<b>closed"));
    assert_non_null(strstr(t, "1006 &lt;b&gt;closed&lt;/b&gt; by &quot;peer&quot;"));
    assert_null(strstr(t, "<svg"));
    assert_null(strstr(t, "<i>10.1.1.1"));
    assert_null(strstr(t, "<u>x"));
    assert_null(strstr(t, "emx<1>"));
    assert_non_null(strstr(t, "h&quot;ost:8443"));
    /* one script, from the admin port, none inline */
    assert_non_null(strstr(t, "<script src=\"/status.js\"></script>"));
    assert_null(strstr(strstr(t, "<script src") + 1, "<script"));
    /* the numbers /instances and /metrics give */
    assert_non_null(strstr(t, "<span id=\"workers\">1</span>"));
    assert_non_null(strstr(t, "<span id=\"uptime\" data-seconds=\"61\">1 min 1 s</span>"));
    assert_non_null(strstr(t, "id=\"pipes-connected\">2<"));
    assert_non_null(strstr(t, "id=\"reloads-ok\">3<"));
    assert_non_null(strstr(t, "id=\"edges-connected\">1<"));
    assert_non_null(strstr(t, "id=\"edges-authenticated\">0<"));
    assert_non_null(strstr(t, "id=\"instance-count\">2<"));
    assert_non_null(strstr(t, "data-instance=\"plain\" data-state=\"up\""));
    assert_non_null(strstr(t, "data-instance=\"&lt;script&gt;alert(1)&lt;/script&gt;\" "
                              "data-state=\"down\""));
    assert_non_null(strstr(t, "<td class=\"n pipes-up\">2</td><td class=\"n writable\">2</td>"));
    assert_non_null(strstr(t, "<td class=\"n requests\">42</td>"));
    assert_non_null(strstr(t, "data-reason=\"timeout\"><td>timeout</td><td>0xA4</td>"));
    assert_non_null(strstr(t, "data-kind=\"reload\""));
    /* tunnels: the sockets relayed now and the bytes so far */
    assert_non_null(strstr(t, "id=\"tunnel-records\">0<"));
    assert_non_null(strstr(t, "id=\"tunnel-device-sockets\">2<"));
    assert_non_null(strstr(t, "id=\"tunnel-client-sockets\">1<"));
    assert_non_null(strstr(t, "id=\"tunnel-bytes-to-owner\">123456<"));
    assert_non_null(strstr(t, "id=\"tunnel-bytes-to-peer\">654321<"));
    assert_non_null(strstr(t, "id=\"tunnel-sockets-refused\">5<"));
    assert_null(strstr(t, "secret-app-key-xyz"));
    emx_textbuf_free(&b);
    emx_status_free(&st);
    emx_router_free(r);
}

/* Two worker loops: the page shows the process, not worker 0 alone. */
static void page_adds_up_every_worker(void **state)
{
    (void)state;
    struct fx f0 = {0}, f1 = {0};
    struct emx_router *rs[2] = {make_router_w(&f0, 0), make_router_w(&f1, 1)};
    struct emx_instance_info set[] = {
        {.id = "plain", .host = "10.0.0.2", .port = 8080, .weight = 1}};
    struct emx_status st0, st1;
    emx_status_init(&st0);
    emx_status_init(&st1);
    const struct emx_status *sts[2] = {&st0, &st1};
    for (int k = 0; k < 2; k++)
        emx_router_discovery_update(rs[k], set, 1, 1000);
    emx_status_track(&st0, rs[0], 1000, 0);
    emx_status_track(&st1, rs[1], 1000, 0);
    struct emx_instance *i0 = emx_router_instance_find(rs[0], "plain");
    struct emx_instance *i1 = emx_router_instance_find(rs[1], "plain");
    pipe_up(&f0, &i0->pipes[0], 1000);
    pipe_up(&f1, &i1->pipes[0], 1000);
    pipe_up(&f1, &i1->pipes[1], 1000);
    i0->requests += 10;
    i1->requests += 20;
    emx_status_track(&st0, rs[0], 2000, 0);
    emx_status_track(&st1, rs[1], 2000, 0);
    i0->requests += 32;
    struct emx_edge *old = emx_router_edge_open(rs[0], (void *)1, 1000);
    struct emx_edge *mid = emx_router_edge_open(rs[1], (void *)2, 1500);
    struct emx_edge *young = emx_router_edge_open(rs[0], (void *)3, 1800);
    assert_true(old && mid && young);

    /* an event only worker 1 saw, newer than the set both workers got */
    emx_status_event(&st1, EMX_EV_PIPE_AUTH, 1, 2500, 9000, "pipe AUTH refused by plain");

    struct emx_server_counters c = {0};
    struct emx_ops_view ov = {.counters = &c, .discovery_plugin = "static", .ready = true};
    struct emx_status_view v = {.ops = &ov, .server_name = "emx", .version = "9", .workers = 2};
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_status_html_n(&b, rs, sts, 2, &v, 3000);
    assert_false(b.failed);
    const char *t = b.data;
    /* one row per instance, every worker's pipes and requests added */
    assert_non_null(strstr(t, "data-instance=\"plain\" data-state=\"degraded\""));
    assert_null(strstr(strstr(t, "data-instance=\"plain\"") + 1, "data-instance=\"plain\""));
    assert_non_null(strstr(t, "<td class=\"n pipes-up\">3</td><td class=\"n writable\">3</td>"));
    assert_non_null(strstr(t, "<td class=\"n requests\">62</td>"));
    /* each worker's rate sample: 10 and 20 requests in the second from 1000 */
    assert_non_null(strstr(t, "<td class=\"n rate\">30.0</td>"));
    assert_non_null(strstr(t, "id=\"pipes-connected\">3<"));
    assert_non_null(strstr(t, "id=\"edges-connected\">3<"));
    assert_non_null(strstr(t, "id=\"edges-accepted\">3<"));
    /* one discovery set, handed to both workers: counted once */
    assert_non_null(strstr(t, "id=\"discovery-updates\">1<"));
    /* events: the instance both workers added is one row, for all; the
     * refusal only worker 1 saw names it, and comes first (newest) */
    const char *added = strstr(t, "instance plain added");
    assert_non_null(added);
    assert_null(strstr(added + 1, "instance plain added"));
    const char *auth = strstr(t, "data-kind=\"pipe-auth\" data-workers=\"1\"");
    const char *all = strstr(t, "data-kind=\"discovery\" data-workers=\"all\"");
    assert_true(auth && all && auth < all);
    assert_non_null(strstr(t, "<td class=\"workers\">1</td><td class=\"text\">pipe AUTH refused by plain"));
    /* the devices of both workers, newest first */
    char hex[3][32];
    snprintf(hex[0], sizeof(hex[0]), "data-endpoint=\"%08" PRIx32 "\"", young->id);
    snprintf(hex[1], sizeof(hex[1]), "data-endpoint=\"%08" PRIx32 "\"", mid->id);
    snprintf(hex[2], sizeof(hex[2]), "data-endpoint=\"%08" PRIx32 "\"", old->id);
    assert_int_equal(mid->id >> EMX_WORKER_SHIFT, 1);
    const char *p0 = strstr(t, hex[0]), *p1 = strstr(t, hex[1]), *p2 = strstr(t, hex[2]);
    assert_true(p0 && p1 && p2 && p0 < p1 && p1 < p2);
    /* each worker's share */
    assert_non_null(strstr(t, "data-worker=\"0\"><td>0</td><td class=\"n edges\">2</td>"
                              "<td class=\"n pipes\">1</td>"));
    assert_non_null(strstr(t, "data-worker=\"1\"><td>1</td><td class=\"n edges\">1</td>"
                              "<td class=\"n pipes\">2</td>"));
    emx_textbuf_free(&b);
    /* one worker: no per-worker table */
    emx_textbuf_init(&b, 0);
    emx_status_html_n(&b, rs, sts, 1, &v, 3000);
    assert_false(b.failed);
    assert_null(strstr(b.data, "worker-loops"));
    assert_non_null(strstr(b.data, "id=\"edges-connected\">2<"));
    emx_textbuf_free(&b);
    emx_status_free(&st0);
    emx_status_free(&st1);
    emx_router_free(rs[0]);
    emx_router_free(rs[1]);
}

static void answer_codes(void **state)
{
    (void)state;
    assert_int_equal(emx_answer_reason_code(EMX_ANS_NO_INSTANCE), 0xA0);
    assert_int_equal(emx_answer_reason_code(EMX_ANS_TIMEOUT), 0xA4);
    assert_int_equal(emx_answer_reason_code(EMX_ANS_TOO_LARGE), 0x8D);
    assert_int_equal(emx_answer_reason_code(EMX_ANS__COUNT), 0);
    assert_string_equal(emx_event_kind_name(EMX_EV_ALL_DOWN), "all-down");
    assert_string_equal(emx_event_kind_name(EMX_EV__COUNT), "event");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(html_escaping),
        cmocka_unit_test(events_ring_is_bounded_and_merges_repeats),
        cmocka_unit_test(track_notices_changes),
        cmocka_unit_test(track_lists_many_instances_within_bounds),
        cmocka_unit_test(page_numbers_and_escaping),
        cmocka_unit_test(page_adds_up_every_worker),
        cmocka_unit_test(answer_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
