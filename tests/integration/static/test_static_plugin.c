/* The built emx-discovery-static.so, loaded with dlopen against a host table
 * of the test's own: initial set, in-place edits, rename replacement, invalid
 * and fixed edits, identical rewrites, delete and recreate, a file or a
 * directory that appears later, and a teardown that lets the loop close.
 * Every wait is bounded by a uv timer. */
#include <dlfcn.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "edgemux/discovery.h"

#define WAIT_MS   5000 /* bound of every wait for something that must happen */
#define QUIET_MS  400  /* how long "nothing happens" is watched for */
#define DELAY_MS  50   /* reload_delay used by the tests */
#define LOG_MAX   256
#define SET_MAX   16
#define ID_PREFIX "[::1]:"

struct rec_instance {
    char *id, *host, *metadata;
    uint16_t port;
    bool tls;
    uint32_t weight, priority;
};

/* What the plugin told the host. */
struct rec {
    int updates;
    struct rec_instance set[SET_MAX];
    size_t count;
    int failures;
    char reason[1024];
    char logs[LOG_MAX][640];
    int nlogs;
    bool stopped;
    int calls_after_stop;
};

struct fx {
    uv_loop_t loop;
    struct emx_host host;
    struct rec rec;
    char dir[PATH_MAX];
    char file[PATH_MAX + 32];
    void *dl;
    const struct emx_discovery_plugin *d;
    void *cfg;
    void *inst;
};

static void rec_clear_set(struct rec *r)
{
    for (size_t i = 0; i < r->count; i++) {
        free(r->set[i].id);
        free(r->set[i].host);
        free(r->set[i].metadata);
    }
    r->count = 0;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static struct rec *rec_of(const struct emx_host *h)
{
    return &((struct fx *)h->core)->rec;
}

static void host_log(const struct emx_host *h, enum emx_log_level level, const char *fmt, ...)
{
    struct rec *r = rec_of(h);
    char line[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (getenv("EMX_TEST_VERBOSE"))
        fprintf(stderr, "[%s] %d %s\n", h->tag, (int)level, line);
    if (r->nlogs < LOG_MAX)
        snprintf(r->logs[r->nlogs++], sizeof(r->logs[0]), "%d %s", (int)level, line);
}

static bool host_log_enabled(const struct emx_host *h, enum emx_log_level level)
{
    (void)h;
    (void)level;
    return true;
}

static int host_post(const struct emx_host *h, void (*fn)(void *), void *arg)
{
    (void)h;
    (void)fn;
    (void)arg;
    return -ESHUTDOWN; /* the static plugin has no thread of its own */
}

static uint64_t host_now(const struct emx_host *h)
{
    return uv_now(h->loop);
}

/* Test versions: a bare number with an optional unit. */
static int parse_num(const char *text, uint64_t *out, const char *unit, uint64_t mul)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text)
        return -EINVAL;
    if (*end && strcmp(end, unit) != 0)
        return -EINVAL;
    *out = *end ? v * mul : v;
    return 0;
}

static int host_parse_size(const char *text, uint64_t *out)
{
    return parse_num(text, out, "KiB", 1024);
}

static int host_parse_duration(const char *text, uint64_t *out)
{
    return parse_num(text, out, "s", 1000);
}

static void host_update(const struct emx_host *h, const struct emx_instance_info *set, size_t count)
{
    struct rec *r = rec_of(h);
    if (r->stopped)
        r->calls_after_stop++;
    rec_clear_set(r);
    assert_true(count <= SET_MAX);
    assert_true(count == 0 || set != NULL);
    for (size_t i = 0; i < count; i++) {
        r->set[i] = (struct rec_instance){
            .id = dup_or_null(set[i].id),
            .host = dup_or_null(set[i].host),
            .metadata = dup_or_null(set[i].metadata),
            .port = set[i].port,
            .tls = set[i].tls,
            .weight = set[i].weight,
            .priority = set[i].priority,
        };
    }
    r->count = count;
    r->updates++;
}

static void host_failed(const struct emx_host *h, const char *reason)
{
    struct rec *r = rec_of(h);
    if (r->stopped)
        r->calls_after_stop++;
    snprintf(r->reason, sizeof(r->reason), "%s", reason);
    r->failures++;
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

static void on_deadline(uv_timer_t *t)
{
    *(bool *)t->data = true;
}

typedef bool (*pred_fn)(struct fx *fx, int arg);

/* Runs the loop until pred holds or ms pass; returns whether it held. */
static bool wait_until(struct fx *fx, pred_fn pred, int arg, uint64_t ms)
{
    uv_timer_t t;
    bool expired = false;
    uv_timer_init(&fx->loop, &t);
    t.data = &expired;
    uv_timer_start(&t, on_deadline, ms, 0);
    while (!(pred && pred(fx, arg)) && !expired)
        uv_run(&fx->loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&fx->loop, UV_RUN_NOWAIT);
    return pred && pred(fx, arg);
}

static void run_for(struct fx *fx, uint64_t ms)
{
    wait_until(fx, NULL, 0, ms);
}

static bool updates_over(struct fx *fx, int n)
{
    return fx->rec.updates > n;
}

static bool failures_over(struct fx *fx, int n)
{
    return fx->rec.failures > n;
}

static bool log_has(struct fx *fx, const char *needle)
{
    for (int i = 0; i < fx->rec.nlogs; i++)
        if (strstr(fx->rec.logs[i], needle))
            return true;
    return false;
}

static const char *wanted_log;

static bool log_appeared(struct fx *fx, int from)
{
    for (int i = from; i < fx->rec.nlogs; i++)
        if (strstr(fx->rec.logs[i], wanted_log))
            return true;
    return false;
}

static void wait_update(struct fx *fx, int before)
{
    assert_true(wait_until(fx, updates_over, before, WAIT_MS));
}

static void wait_failure(struct fx *fx, int before)
{
    assert_true(wait_until(fx, failures_over, before, WAIT_MS));
}

static const struct rec_instance *find(struct fx *fx, const char *id)
{
    for (size_t i = 0; i < fx->rec.count; i++)
        if (strcmp(fx->rec.set[i].id, id) == 0)
            return &fx->rec.set[i];
    return NULL;
}

/* ---- plugin ---- */

static const struct emx_option *option(struct fx *fx, const char *name)
{
    for (const struct emx_option *o = fx->d->options; o && o->name; o++)
        if (strcmp(o->name, name) == 0)
            return o;
    fail_msg("option %s not in the table", name);
    return NULL;
}

static void set_str(struct fx *fx, const char *name, const char *value)
{
    const struct emx_option *o = option(fx, name);
    assert_int_equal(o->type, EMX_OPT_STRING);
    memcpy((char *)fx->cfg + o->offset, &value, sizeof(value));
}

static void set_u64(struct fx *fx, const char *name, uint64_t value)
{
    const struct emx_option *o = option(fx, name);
    assert_true(o->type == EMX_OPT_DURATION || o->type == EMX_OPT_SIZE);
    memcpy((char *)fx->cfg + o->offset, &value, sizeof(value));
}

/* Binds every default the way the core would, through the host's parsers. */
static void set_defaults(struct fx *fx)
{
    for (const struct emx_option *o = fx->d->options; o->name; o++) {
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
        set_u64(fx, o->name, v);
    }
}

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    assert_int_equal(uv_loop_init(&fx->loop), 0);

    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof(fx->dir), "%s/emx-static-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(fx->file, sizeof(fx->file), "%s/instances.yaml", fx->dir);

    fx->dl = dlopen(EMX_STATIC_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    if (!fx->dl)
        fail_msg("dlopen: %s", dlerror());
    fx->d = dlsym(fx->dl, EMX_DISCOVERY_SYMBOL);
    assert_non_null(fx->d);
    assert_int_equal(fx->d->hdr.magic, EMX_PLUGIN_MAGIC);
    assert_int_equal(fx->d->hdr.kind, EMX_PLUGIN_DISCOVERY);
    assert_string_equal(fx->d->hdr.name, "static");

    fx->host = (struct emx_host){
        .struct_size = sizeof(struct emx_host),
        .abi_major = EMX_ABI_MAJOR,
        .abi_minor = EMX_ABI_MINOR,
        .tag = "discovery:static.0",
        .loop = &fx->loop,
        .core = fx,
        .log = host_log,
        .log_enabled = host_log_enabled,
        .post = host_post,
        .now_ms = host_now,
        .parse_size = host_parse_size,
        .parse_duration = host_parse_duration,
        .discovery_update = host_update,
        .discovery_failed = host_failed,
    };
    fx->cfg = calloc(1, fx->d->config_size);
    assert_non_null(fx->cfg);
    set_defaults(fx);
    set_str(fx, "file", fx->file);
    set_u64(fx, "reload_delay", DELAY_MS);
    /* Long enough that only file events can explain a reload. */
    set_u64(fx, "poll_interval", 3600 * 1000);
    *state = fx;
    return 0;
}

static void start(struct fx *fx)
{
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &fx->inst), 0);
    assert_non_null(fx->inst);
    assert_int_equal(fx->d->start(fx->inst), 0);
}

/* stop, let libuv close every handle, destroy: the loop must then close. */
static void finish(struct fx *fx, bool destroy_first)
{
    if (fx->inst) {
        fx->d->stop(fx->inst);
        fx->rec.stopped = true;
        if (destroy_first) {
            fx->d->destroy(fx->inst);
            fx->inst = NULL;
        }
    }
    /* An unreferenced deadline: the loop ends when the plugin let go. */
    uv_timer_t t;
    bool expired = false;
    uv_timer_init(&fx->loop, &t);
    t.data = &expired;
    uv_timer_start(&t, on_deadline, WAIT_MS, 0);
    uv_unref((uv_handle_t *)&t);
    while (uv_loop_alive(&fx->loop) && !expired)
        uv_run(&fx->loop, UV_RUN_ONCE);
    assert_false(expired);
    if (fx->inst) {
        fx->d->destroy(fx->inst);
        fx->inst = NULL;
    }
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    assert_int_equal(fx->rec.calls_after_stop, 0);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    if (!fx->rec.stopped || fx->inst)
        finish(fx, false);
    rec_clear_set(&fx->rec);
    free(fx->cfg);
    dlclose(fx->dl);
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
    start(fx);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 3);
    assert_int_equal(fx->rec.failures, 0);

    const struct rec_instance *a = find(fx, "alpha");
    assert_non_null(a);
    assert_string_equal(a->host, "127.0.0.1");
    assert_int_equal(a->port, 9001);
    assert_true(a->tls);
    assert_int_equal(a->weight, 0);
    assert_int_equal(a->priority, 2);
    assert_string_equal(a->metadata, "rack 1");

    const struct rec_instance *b = find(fx, ID_PREFIX "9002");
    assert_non_null(b);
    assert_string_equal(b->host, "::1");
    assert_false(b->tls);
    assert_int_equal(b->weight, 1);
    assert_int_equal(b->priority, 0);
    assert_null(b->metadata);

    const struct rec_instance *c = find(fx, "localhost:9003");
    assert_non_null(c);
    assert_int_equal(c->weight, 5);
    assert_int_equal(c->priority, 1);
    assert_true(log_has(fx, "3 instances; added "));

    /* Nothing more without a change. */
    run_for(fx, QUIET_MS);
    assert_int_equal(fx->rec.updates, 1);
}

static void test_edit_in_place(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    int n = fx->rec.updates;
    write_file(fx->file, "instances:\n"
                         "  - {id: alpha, address: 127.0.0.1, port: 9001, tls: true, weight: 3}\n"
                         "  - {address: localhost, port: 9004}\n");
    wait_update(fx, n);
    assert_int_equal(fx->rec.count, 2);
    assert_int_equal(find(fx, "alpha")->weight, 3);
    assert_non_null(find(fx, "localhost:9004"));
    assert_true(log_has(fx, "added localhost:9004"));
    assert_true(log_has(fx, "removed [::1]:9002, localhost:9003"));
    assert_true(log_has(fx, "changed alpha"));
    /* A burst of write events is one reload. */
    run_for(fx, QUIET_MS);
    assert_int_equal(fx->rec.updates, n + 1);
}

static void test_replace_by_rename(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    int n = fx->rec.updates;
    replace_file(fx, "instances:\n  - {address: 10.1.1.1, port: 9100}\n");
    wait_update(fx, n);
    assert_int_equal(fx->rec.count, 1);
    assert_non_null(find(fx, "10.1.1.1:9100"));
    /* The watch is on the directory, so it survives the rename: again. */
    n = fx->rec.updates;
    replace_file(fx, "instances:\n  - {address: 10.1.1.2, port: 9100}\n");
    wait_update(fx, n);
    assert_non_null(find(fx, "10.1.1.2:9100"));
    /* Other files in the directory are ignored. */
    n = fx->rec.updates;
    int logs = fx->rec.nlogs;
    char other[PATH_MAX + 32];
    snprintf(other, sizeof(other), "%s/unrelated.txt", fx->dir);
    write_file(other, "x\n");
    run_for(fx, QUIET_MS);
    assert_int_equal(fx->rec.updates, n);
    wanted_log = "unchanged";
    assert_false(log_appeared(fx, logs));
}

static void test_invalid_then_fixed(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    int n = fx->rec.updates;
    write_file(fx->file, "instances:\n"
                         "  - address: 127.0.0.1\n"
                         "    port: 9001\n"
                         "    prot: 9002\n");
    wait_failure(fx, 0);
    char where[PATH_MAX + 64];
    snprintf(where, sizeof(where), "%s:4: ", fx->file);
    assert_non_null(strstr(fx->rec.reason, where));
    assert_true(log_has(fx, where));
    assert_true(log_has(fx, "keeping the last good set (3 instances)"));
    run_for(fx, QUIET_MS);
    assert_int_equal(fx->rec.updates, n);
    assert_int_equal(fx->rec.failures, 1);

    /* Several errors: every one is logged with its line, the reason counts them. */
    write_file(fx->file, "instances:\n"
                         "  - {address: a, port: 0}\n"
                         "  - {address: b, port: 2, tls: maybe}\n");
    wait_failure(fx, 1);
    snprintf(where, sizeof(where), "%s:2: ", fx->file);
    assert_true(log_has(fx, where));
    snprintf(where, sizeof(where), "%s:3: ", fx->file);
    assert_true(log_has(fx, where));
    assert_non_null(strstr(fx->rec.reason, "(and 1 more error)"));

    write_file(fx->file, "instances:\n  - {address: 127.0.0.1, port: 9001}\n");
    wait_update(fx, n);
    assert_int_equal(fx->rec.count, 1);
    assert_non_null(find(fx, "127.0.0.1:9001"));
    assert_true(log_has(fx, "valid again"));
    assert_int_equal(fx->rec.failures, 2);
}

static void test_identical_rewrite(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    int logs = fx->rec.nlogs;
    write_file(fx->file, three);
    wanted_log = "unchanged";
    assert_true(wait_until(fx, log_appeared, logs, WAIT_MS));
    /* Same set in another order and layout is the same set. */
    logs = fx->rec.nlogs;
    replace_file(fx, "instances:\n"
                     "  - {address: localhost, port: 9003, weight: 5, priority: 1}\n"
                     "  - {address: \"::1\", port: 9002, weight: 1}\n"
                     "  - {id: alpha, address: 127.0.0.1, port: 9001, tls: true, weight: 0,\n"
                     "     priority: 2, metadata: rack 1}\n");
    assert_true(wait_until(fx, log_appeared, logs, WAIT_MS));
    run_for(fx, QUIET_MS);
    assert_int_equal(fx->rec.updates, 1);
    assert_int_equal(fx->rec.failures, 0);
}

static void test_delete_and_recreate(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    assert_int_equal(unlink(fx->file), 0);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, "cannot read"));
    assert_int_equal(fx->rec.updates, 1);
    write_file(fx->file, "instances:\n  - {address: 127.0.0.1, port: 9005}\n");
    wait_update(fx, 1);
    assert_int_equal(fx->rec.count, 1);
    assert_non_null(find(fx, "127.0.0.1:9005"));
}

static void test_missing_at_start(void **state)
{
    struct fx *fx = *state;
    start(fx);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, fx->file));
    assert_non_null(strstr(fx->rec.reason, "cannot read"));
    assert_int_equal(fx->rec.updates, 0);
    replace_file(fx, three);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 3);
    assert_int_equal(fx->rec.failures, 1);
}

static void test_invalid_at_start(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, "instances:\n  - {address: a, port: 99999}\n");
    start(fx);
    wait_failure(fx, 0);
    char where[PATH_MAX + 64];
    snprintf(where, sizeof(where), "%s:2: port: ", fx->file);
    assert_non_null(strstr(fx->rec.reason, where));
    assert_true(log_has(fx, "keeping the last good set (0 instances)"));
    write_file(fx->file, "instances: []\n");
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 0);
}

/* A directory that does not exist yet cannot be watched: the periodic
 * re-read finds the file, and re-arms the watch. */
static void test_missing_directory_poll(void **state)
{
    struct fx *fx = *state;
    char sub[PATH_MAX + 32], file[PATH_MAX + 64];
    snprintf(sub, sizeof(sub), "%s/later", fx->dir);
    snprintf(file, sizeof(file), "%s/instances.yaml", sub);
    set_str(fx, "file", file);
    set_u64(fx, "poll_interval", 100);
    start(fx);
    wait_failure(fx, 0);
    assert_true(log_has(fx, "cannot watch directory"));
    assert_int_equal(mkdir(sub, 0700), 0);
    write_file(file, three);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 3);
    wanted_log = "watching directory";
    assert_true(wait_until(fx, log_appeared, 0, WAIT_MS));
    int n = fx->rec.updates;
    write_file(file, "instances: []\n");
    wait_update(fx, n);
    assert_int_equal(fx->rec.count, 0);
}

/* Stopping with a read still in flight: no host call afterwards, and the
 * loop still closes. */
static void test_stop_while_reading(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    finish(fx, false);
    assert_int_equal(fx->rec.updates, 0);
}

/* destroy right after stop, before libuv ran the close callbacks. */
static void test_destroy_before_close(void **state)
{
    struct fx *fx = *state;
    write_file(fx->file, three);
    start(fx);
    wait_update(fx, 0);
    finish(fx, true);
}

static void test_create_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    set_str(fx, "file", "");
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    set_str(fx, "file", "conf/");
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    assert_true(log_has(fx, "names a directory"));
    set_str(fx, "file", fx->file);
    set_u64(fx, "max_size", 0);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    assert_null(inst);
    assert_int_equal(fx->d->reconfigure ? 1 : 0, 1);
}

/* destroy without start frees at once: nothing was given to libuv. */
static void test_destroy_without_start(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), 0);
    fx->d->destroy(inst);
    assert_false(uv_loop_alive(&fx->loop));
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
