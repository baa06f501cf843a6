/* The discovery plugin tests' host table: see test_host.h. */
#include "test_host.h"

#include <dlfcn.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static struct th_host *th_of(const struct emx_host *h)
{
    return h->core;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static void clear_set(struct th_rec *r)
{
    for (size_t i = 0; i < r->count; i++) {
        free(r->set[i].id);
        free(r->set[i].host);
        free(r->set[i].metadata);
    }
    r->count = 0;
}

static void host_log(const struct emx_host *h, enum emx_log_level level, const char *fmt, ...)
{
    struct th_host *th = th_of(h);
    int cut = (int)th->conf.line_len - 1;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (getenv("EMX_TEST_VERBOSE"))
        fprintf(stderr, "[%s] %d %.*s\n", h->tag, (int)level, cut, line);
    if ((size_t)th->rec.nlogs < th->conf.log_max)
        snprintf(th->logs + (size_t)th->rec.nlogs++ * th->conf.log_len, th->conf.log_len, "%d %.*s",
                 (int)level, cut, line);
}

static bool host_log_enabled(const struct emx_host *h, enum emx_log_level level)
{
    return !th_of(h)->conf.debug_disabled || level <= EMX_LOG_INFO;
}

static int host_post(const struct emx_host *h, void (*fn)(void *), void *arg)
{
    (void)h;
    (void)fn;
    (void)arg;
    return -ESHUTDOWN; /* a plugin without a thread of its own */
}

static uint64_t host_now(const struct emx_host *h)
{
    return uv_now(h->loop);
}

static void host_update(const struct emx_host *h, const struct emx_instance_info *set, size_t count)
{
    struct th_rec *r = &th_of(h)->rec;
    if (r->stopped)
        r->calls_after_stop++;
    clear_set(r);
    assert_true(count <= th_of(h)->conf.set_max);
    assert_true(count == 0 || set != NULL);
    for (size_t i = 0; i < count; i++) {
        r->set[i] = (struct th_instance){
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
    if (count == 0)
        r->empty_updates++;
    if (getenv("EMX_TEST_VERBOSE"))
        fprintf(stderr, "update %d: %zu instances\n", r->updates, count);
}

static void host_failed(const struct emx_host *h, const char *reason)
{
    struct th_rec *r = &th_of(h)->rec;
    if (r->stopped)
        r->calls_after_stop++;
    snprintf(r->reason, sizeof(r->reason), "%s", reason);
    if (r->failures < TH_REASONS)
        snprintf(r->reasons[r->failures], sizeof(r->reasons[0]), "%s", reason);
    r->failures++;
    if (getenv("EMX_TEST_VERBOSE"))
        fprintf(stderr, "failure %d: %s\n", r->failures, reason);
}

void th_open(struct th_host *th, const struct th_config *conf, void *user)
{
    assert_true(conf->line_len > 0 && conf->line_len <= 1024);
    th->conf = *conf;
    th->user = user;
    th->rec.set = calloc(conf->set_max, sizeof(*th->rec.set));
    assert_non_null(th->rec.set);
    th->logs = calloc(conf->log_max, conf->log_len);
    assert_non_null(th->logs);
    assert_int_equal(uv_loop_init(&th->loop), 0);

    th->dl = dlopen(conf->plugin, RTLD_NOW | RTLD_LOCAL);
    if (!th->dl)
        fail_msg("dlopen: %s", dlerror());
    th->d = dlsym(th->dl, EMX_DISCOVERY_SYMBOL);
    assert_non_null(th->d);
    assert_int_equal(th->d->hdr.magic, EMX_PLUGIN_MAGIC);
    assert_int_equal(th->d->hdr.kind, EMX_PLUGIN_DISCOVERY);
    assert_string_equal(th->d->hdr.name, conf->name);

    snprintf(th->tag, sizeof(th->tag), "discovery:%s.0", conf->name);
    th->host = (struct emx_host){
        .struct_size = sizeof(struct emx_host),
        .abi_major = EMX_ABI_MAJOR,
        .abi_minor = EMX_ABI_MINOR,
        .tag = th->tag,
        .loop = &th->loop,
        .core = th,
        .log = host_log,
        .log_enabled = host_log_enabled,
        .post = host_post,
        .now_ms = host_now,
        .parse_size = conf->parse_size,
        .parse_duration = conf->parse_duration,
        .discovery_update = host_update,
        .discovery_failed = host_failed,
    };
    th->cfg = calloc(1, th->d->config_size);
    assert_non_null(th->cfg);
}

void th_close(struct th_host *th)
{
    clear_set(&th->rec);
    free(th->cfg);
    th->cfg = NULL;
    if (th->dl)
        dlclose(th->dl);
    th->dl = NULL;
    free(th->rec.set);
    th->rec.set = NULL;
    free(th->logs);
    th->logs = NULL;
}

const char *th_log(const struct th_host *th, int i)
{
    return th->logs + (size_t)i * th->conf.log_len;
}

bool th_log_has(const struct th_host *th, const char *needle)
{
    return th_log_count(th, needle) > 0;
}

int th_log_count(const struct th_host *th, const char *needle)
{
    int n = 0;
    for (int i = 0; i < th->rec.nlogs; i++)
        n += strstr(th_log(th, i), needle) != NULL;
    return n;
}

void th_dump_logs(const struct th_host *th)
{
    for (int i = 0; i < th->rec.nlogs; i++)
        fprintf(stderr, "  log: %s\n", th_log(th, i));
}

const struct th_instance *th_find(const struct th_host *th, const char *id)
{
    for (size_t i = 0; i < th->rec.count; i++)
        if (strcmp(th->rec.set[i].id, id) == 0)
            return &th->rec.set[i];
    return NULL;
}

static void on_deadline(uv_timer_t *t)
{
    *(bool *)t->data = true;
}

bool th_wait_until(struct th_host *th, th_pred pred, long arg, uint64_t ms)
{
    uv_timer_t t;
    bool expired = false;
    uv_timer_init(&th->loop, &t);
    t.data = &expired;
    uv_timer_start(&t, on_deadline, ms, 0);
    while (!(pred && pred(th, arg)) && !expired)
        uv_run(&th->loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&th->loop, UV_RUN_NOWAIT);
    return pred && pred(th, arg);
}

void th_run_for(struct th_host *th, uint64_t ms)
{
    th_wait_until(th, NULL, 0, ms);
}

bool th_updates_over(struct th_host *th, long n)
{
    return th->rec.updates > n;
}

bool th_failures_over(struct th_host *th, long n)
{
    return th->rec.failures > n;
}

bool th_count_is(struct th_host *th, long n)
{
    return th->rec.updates > 0 && (long)th->rec.count == n;
}

void th_wait_update(struct th_host *th, int before, uint64_t ms)
{
    if (!th_wait_until(th, th_updates_over, before, ms))
        fail_msg("no update after %d (failures %d: %s)", before, th->rec.failures, th->rec.reason);
}

void th_wait_failure(struct th_host *th, int before, uint64_t ms)
{
    if (!th_wait_until(th, th_failures_over, before, ms))
        fail_msg("no failure after %d (updates %d)", before, th->rec.updates);
}

const struct emx_option *th_option(const struct th_host *th, const char *name)
{
    for (const struct emx_option *o = th->d->options; o && o->name; o++)
        if (strcmp(o->name, name) == 0)
            return o;
    fail_msg("option %s not in the table", name);
    return NULL;
}

void th_set(struct th_host *th, const char *name, unsigned types, const void *value, size_t size)
{
    const struct emx_option *o = th_option(th, name);
    if (!(types & TH_TYPE(o->type)))
        fail_msg("option %s has type %d", name, (int)o->type);
    memcpy((char *)th->cfg + o->offset, value, size);
}

void th_set_str(struct th_host *th, const char *name, const char *value)
{
    th_set(th, name, TH_TYPE(EMX_OPT_STRING) | TH_TYPE(EMX_OPT_SECRET), &value, sizeof(value));
}

void th_set_bool(struct th_host *th, const char *name, bool value)
{
    th_set(th, name, TH_TYPE(EMX_OPT_BOOL), &value, sizeof(value));
}

void th_set_u64(struct th_host *th, const char *name, uint64_t value)
{
    th_set(th, name, TH_TYPE(EMX_OPT_DURATION) | TH_TYPE(EMX_OPT_SIZE), &value, sizeof(value));
}

int th_parse_unit(const char *text, uint64_t *out, const char *const *units, const uint64_t *mul)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text)
        return -EINVAL;
    if (!*end) {
        *out = v;
        return 0;
    }
    for (size_t i = 0; units[i]; i++) {
        if (strcmp(end, units[i]) == 0) {
            *out = v * mul[i];
            return 0;
        }
    }
    return -EINVAL;
}

void th_start(struct th_host *th)
{
    assert_int_equal(th->d->create(&th->host, th->cfg, &th->inst), 0);
    assert_non_null(th->inst);
    assert_int_equal(th->d->start(th->inst), 0);
}

void th_stop(struct th_host *th, bool destroy)
{
    if (!th->inst)
        return;
    th->d->stop(th->inst);
    th->rec.stopped = true;
    if (destroy) {
        th->d->destroy(th->inst);
        th->inst = NULL;
    }
}

void th_await_idle(struct th_host *th, uint64_t ms)
{
    th->expired = false;
    uv_timer_init(&th->loop, &th->deadline);
    th->deadline.data = &th->expired;
    uv_timer_start(&th->deadline, on_deadline, ms, 0);
    uv_unref((uv_handle_t *)&th->deadline);
    while (uv_loop_alive(&th->loop) && !th->expired)
        uv_run(&th->loop, UV_RUN_ONCE);
    assert_false(th->expired);
}

void th_close_loop(struct th_host *th)
{
    uv_close((uv_handle_t *)&th->deadline, NULL);
    uv_run(&th->loop, UV_RUN_DEFAULT);
    assert_int_equal(th->rec.calls_after_stop, 0);
    assert_int_equal(uv_loop_close(&th->loop), 0);
}
