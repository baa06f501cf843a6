/* The built emx-discovery-static.so, loaded with dlopen against a host table
 * of tests/integration/common: initial set, in-place edits, rename replacement, invalid
 * and fixed edits, identical rewrites, delete and recreate, a file or a
 * directory that appears later, and a teardown that lets the loop close.
 * Every wait is bounded by a uv timer. */
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "edgemux/discovery.h"
#include "test_host.h"

#define WAIT_MS   5000 /* bound of every wait for something that must happen */
#define QUIET_MS  400  /* how long "nothing happens" is watched for */
#define DELAY_MS  50   /* reload_delay used by the tests */
#define LOG_MAX   256
#define SET_MAX   16
#define ID_PREFIX "[::1]:"

struct fx {
    struct th_host th;
    char dir[PATH_MAX];
    char file[PATH_MAX + 32];
};

/* Test versions: a bare number with an optional unit. */
static int parse_num(const char *text, uint64_t *out, const char *unit, uint64_t mul)
{
    const char *const units[] = {unit, NULL};
    return th_parse_unit(text, out, units, &mul);
}

static int host_parse_size(const char *text, uint64_t *out)
{
    return parse_num(text, out, "KiB", 1024);
}

static int host_parse_duration(const char *text, uint64_t *out)
{
    return parse_num(text, out, "s", 1000);
}

/* ---- files ---- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* The way editors and config managers do it: write aside, rename over. */
static void replace_file(struct fx *fx, const char *text)
{
    char tmp[PATH_MAX + 32];
    snprintf(tmp, sizeof(tmp), "%s/.instances.yaml.tmp", fx->dir);
    write_file(tmp, text);
    assert_int_equal(rename(tmp, fx->file), 0);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* ---- loop ---- */

static const char *wanted_log;

static bool log_appeared(struct th_host *th, long from)
{
    for (int i = (int)from; i < th->rec.nlogs; i++)
        if (strstr(th_log(th, i), wanted_log))
            return true;
    return false;
}

/* ---- plugin ---- */

/* Binds every default the way the core would, through the host's parsers. */
static void set_defaults(struct fx *fx)
{
    for (const struct emx_option *o = fx->th.d->options; o->name; o++) {
        uint64_t v = 0;
        if (!o->def)
            continue;
        if (o->type == EMX_OPT_DURATION) {
            char t[32];
            /* The test parser knows only "s": scale "200ms" by hand. */
            size_t n = strlen(o->def);
            if (n > 2 && strcmp(o->def + n - 2, "ms") == 0) {
                snprintf(t, sizeof(t), "%.*s", (int)(n - 2), o->def);
                assert_int_equal(parse_num(t, &v, "", 1), 0);
            } else {
                assert_int_equal(host_parse_duration(o->def, &v), 0);
            }
        } else if (o->type == EMX_OPT_SIZE) {
            assert_int_equal(parse_num(o->def, &v, "MiB", 1024 * 1024), 0);
        } else {
            fail_msg("unexpected default type for %s", o->name);
        }
        th_set_u64(&fx->th, o->name, v);
    }
}

static void set_file(struct fx *fx, const char *value)
{
    th_set(&fx->th, "file", TH_TYPE(EMX_OPT_STRING), &value, sizeof(value));
}

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof(fx->dir), "%s/emx-static-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(fx->file, sizeof(fx->file), "%s/instances.yaml", fx->dir);

    const struct th_config conf = {
        .plugin = EMX_STATIC_PLUGIN,
        .name = "static",
        .set_max = SET_MAX,
        .log_max = LOG_MAX,
        .log_len = 640,
        .line_len = 600,
        .parse_size = host_parse_size,
        .parse_duration = host_parse_duration,
    };
    th_open(&fx->th, &conf, fx);
    set_defaults(fx);
    set_file(fx, fx->file);
    th_set_u64(&fx->th, "reload_delay", DELAY_MS);
    /* Long enough that only file events can explain a reload. */
    th_set_u64(&fx->th, "poll_interval", 3600 * 1000);
    *state = fx;
    return 0;
}

/* stop, let libuv close every handle, destroy: the loop must then close. */
static void finish(struct fx *fx, bool destroy_first)
{
    th_stop(&fx->th, destroy_first);
    /* An unreferenced deadline: the loop ends when the plugin let go. */
    th_await_idle(&fx->th, WAIT_MS);
    if (fx->th.inst) {
        fx->th.d->destroy(fx->th.inst);
        fx->th.inst = NULL;
    }
    th_close_loop(&fx->th);
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    if (!fx->th.rec.stopped || fx->th.inst)
        finish(fx, false);
    th_close(&fx->th);
    nftw(fx->dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    free(fx);
    return 0;
}

/* ---- tests ---- */

static const char *const three = "# three platforms\n"
                                 "instances:\n"
                                 "  - id: alpha\n"
                                 "    address: 127.0.0.1\n"
                                 "    port: 9001\n"
                                 "    tls: true\n"
                                 "    weight: 0\n"
                                 "    priority: 2\n"
                                 "    metadata: \"rack 1\"\n"
                                 "  - address: \"::1\"\n"
                                 "    port: 9002\n"
                                 "  - address: localhost\n"
                                 "    port: 9003\n"
                                 "    weight: 5\n"
                                 "    priority: 1\n";

static void test_initial_set(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);
    assert_int_equal(fx->th.rec.failures, 0);

    const struct th_instance *a = th_find(&fx->th, "alpha");
    assert_non_null(a);
    assert_string_equal(a->host, "127.0.0.1");
    assert_int_equal(a->port, 9001);
    assert_true(a->tls);
    assert_int_equal(a->weight, 0);
    assert_int_equal(a->priority, 2);
    assert_string_equal(a->metadata, "rack 1");

    const struct th_instance *b = th_find(&fx->th, ID_PREFIX "9002");
    assert_non_null(b);
    assert_string_equal(b->host, "::1");
    assert_false(b->tls);
    assert_int_equal(b->weight, 1);
    assert_int_equal(b->priority, 0);
    assert_null(b->metadata);

    const struct th_instance *c = th_find(&fx->th, "localhost:9003");
    assert_non_null(c);
    assert_int_equal(c->weight, 5);
    assert_int_equal(c->priority, 1);
    assert_true(th_log_has(&fx->th, "3 instances; added "));

    /* Nothing more without a change. */
    th_run_for(&fx->th, QUIET_MS);
    assert_int_equal(fx->th.rec.updates, 1);
}

static void test_edit_in_place(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    int n = fx->th.rec.updates;
    write_file(fx->file, "instances:\n"
                         "  - {id: alpha, address: 127.0.0.1, port: 9001, tls: true, weight: 3}\n"
                         "  - {address: localhost, port: 9004}\n");
    th_wait_update(&fx->th, n, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    assert_int_equal(th_find(&fx->th, "alpha")->weight, 3);
    assert_non_null(th_find(&fx->th, "localhost:9004"));
    assert_true(th_log_has(&fx->th, "added localhost:9004"));
    assert_true(th_log_has(&fx->th, "removed [::1]:9002, localhost:9003"));
    assert_true(th_log_has(&fx->th, "changed alpha"));
    /* A burst of write events is one reload. */
    th_run_for(&fx->th, QUIET_MS);
    assert_int_equal(fx->th.rec.updates, n + 1);
}

static void test_replace_by_rename(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    int n = fx->th.rec.updates;
    replace_file(fx, "instances:\n  - {address: 10.1.1.1, port: 9100}\n");
    th_wait_update(&fx->th, n, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "10.1.1.1:9100"));
    /* The watch is on the directory, so it survives the rename: again. */
    n = fx->th.rec.updates;
    replace_file(fx, "instances:\n  - {address: 10.1.1.2, port: 9100}\n");
    th_wait_update(&fx->th, n, WAIT_MS);
    assert_non_null(th_find(&fx->th, "10.1.1.2:9100"));
    /* Other files in the directory are ignored. */
    n = fx->th.rec.updates;
    int logs = fx->th.rec.nlogs;
    char other[PATH_MAX + 32];
    snprintf(other, sizeof(other), "%s/unrelated.txt", fx->dir);
    write_file(other, "x\n");
    th_run_for(&fx->th, QUIET_MS);
    assert_int_equal(fx->th.rec.updates, n);
    wanted_log = "unchanged";
    assert_false(log_appeared(&fx->th, logs));
}

static void test_invalid_then_fixed(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    int n = fx->th.rec.updates;
    write_file(fx->file, "instances:\n"
                         "  - address: 127.0.0.1\n"
                         "    port: 9001\n"
                         "    prot: 9002\n");
    th_wait_failure(&fx->th, 0, WAIT_MS);
    char where[PATH_MAX + 64];
    snprintf(where, sizeof(where), "%s:4: ", fx->file);
    assert_non_null(strstr(fx->th.rec.reason, where));
    assert_true(th_log_has(&fx->th, where));
    assert_true(th_log_has(&fx->th, "keeping the last good set (3 instances)"));
    th_run_for(&fx->th, QUIET_MS);
    assert_int_equal(fx->th.rec.updates, n);
    assert_int_equal(fx->th.rec.failures, 1);

    /* Several errors: every one is logged with its line, the reason counts them. */
    write_file(fx->file, "instances:\n"
                         "  - {address: a, port: 0}\n"
                         "  - {address: b, port: 2, tls: maybe}\n");
    th_wait_failure(&fx->th, 1, WAIT_MS);
    snprintf(where, sizeof(where), "%s:2: ", fx->file);
    assert_true(th_log_has(&fx->th, where));
    snprintf(where, sizeof(where), "%s:3: ", fx->file);
    assert_true(th_log_has(&fx->th, where));
    assert_non_null(strstr(fx->th.rec.reason, "(and 1 more error)"));

    write_file(fx->file, "instances:\n  - {address: 127.0.0.1, port: 9001}\n");
    th_wait_update(&fx->th, n, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "127.0.0.1:9001"));
    assert_true(th_log_has(&fx->th, "valid again"));
    assert_int_equal(fx->th.rec.failures, 2);
}

static void test_identical_rewrite(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    int logs = fx->th.rec.nlogs;
    write_file(fx->file, three);
    wanted_log = "unchanged";
    assert_true(th_wait_until(&fx->th, log_appeared, logs, WAIT_MS));
    /* Same set in another order and layout is the same set. */
    logs = fx->th.rec.nlogs;
    replace_file(fx, "instances:\n"
                     "  - {address: localhost, port: 9003, weight: 5, priority: 1}\n"
                     "  - {address: \"::1\", port: 9002, weight: 1}\n"
                     "  - {id: alpha, address: 127.0.0.1, port: 9001, tls: true, weight: 0,\n"
                     "     priority: 2, metadata: rack 1}\n");
    assert_true(th_wait_until(&fx->th, log_appeared, logs, WAIT_MS));
    th_run_for(&fx->th, QUIET_MS);
    assert_int_equal(fx->th.rec.updates, 1);
    assert_int_equal(fx->th.rec.failures, 0);
}

static void test_delete_and_recreate(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(unlink(fx->file), 0);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "cannot read"));
    assert_int_equal(fx->th.rec.updates, 1);
    write_file(fx->file, "instances:\n  - {address: 127.0.0.1, port: 9005}\n");
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "127.0.0.1:9005"));
}

static void test_missing_at_start(void **state)
{
    struct fx *fx = *state;
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, fx->file));
    assert_non_null(strstr(fx->th.rec.reason, "cannot read"));
    assert_int_equal(fx->th.rec.updates, 0);
    replace_file(fx, three);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);
    assert_int_equal(fx->th.rec.failures, 1);
}

static void test_invalid_at_start(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, "instances:\n  - {address: a, port: 99999}\n");
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    char where[PATH_MAX + 64];
    snprintf(where, sizeof(where), "%s:2: port: ", fx->file);
    assert_non_null(strstr(fx->th.rec.reason, where));
    assert_true(th_log_has(&fx->th, "keeping the last good set (0 instances)"));
    write_file(fx->file, "instances: []\n");
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
}

/* A directory that does not exist yet cannot be watched: the periodic
 * re-read finds the file, and re-arms the watch. */
static void test_missing_directory_poll(void **state)
{
    struct fx *fx = *state;
    char sub[PATH_MAX + 32], file[PATH_MAX + 64];
    snprintf(sub, sizeof(sub), "%s/later", fx->dir);
    snprintf(file, sizeof(file), "%s/instances.yaml", sub);
    set_file(fx, file);
    th_set_u64(&fx->th, "poll_interval", 100);
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_true(th_log_has(&fx->th, "cannot watch directory"));
    assert_int_equal(mkdir(sub, 0700), 0);
    write_file(file, three);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);
    wanted_log = "watching directory";
    assert_true(th_wait_until(&fx->th, log_appeared, 0, WAIT_MS));
    int n = fx->th.rec.updates;
    write_file(file, "instances: []\n");
    th_wait_update(&fx->th, n, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
}

/* Stopping with a read still in flight: no host call afterwards, and the
 * loop still closes. */
static void test_stop_while_reading(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    finish(fx, false);
    assert_int_equal(fx->th.rec.updates, 0);
}

/* destroy right after stop, before libuv ran the close callbacks. */
static void test_destroy_before_close(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    finish(fx, true);
}

static void test_create_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    set_file(fx, "");
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    set_file(fx, "conf/");
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    assert_true(th_log_has(&fx->th, "names a directory"));
    set_file(fx, fx->file);
    th_set_u64(&fx->th, "max_size", 0);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    assert_null(inst);
    assert_int_equal(fx->th.d->reconfigure ? 1 : 0, 1);
}

/* destroy without start frees at once: nothing was given to libuv. */
static void test_destroy_without_start(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), 0);
    fx->th.d->destroy(inst);
    assert_false(uv_loop_alive(&fx->th.loop));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_initial_set, setup, teardown),
        cmocka_unit_test_setup_teardown(test_edit_in_place, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replace_by_rename, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_then_fixed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identical_rewrite, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delete_and_recreate, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_at_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_at_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_directory_poll, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_while_reading, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_before_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_without_start, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
