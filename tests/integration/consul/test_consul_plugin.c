/* The built emx-discovery-consul.so, loaded with dlopen against a host table
 * of the test's own and run against consul_fixture.py: initial set, changes
 * seen through blocking queries, an index that goes backwards, HTTP errors
 * with backoff, refused connections and timeouts, bad answers, ACL tokens
 * (which must never reach a log line), the rate limit, empty answers and
 * tag filtering. Every wait is bounded by a uv timer or a socket timeout. */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "edgemux/discovery.h"

#define WAIT_MS 10000 /* bound of every wait for something that must happen (loaded CI) */
#define LOG_MAX 512
#define SET_MAX 16
#define TOKEN   "b0b5e1c2-token-that-must-never-be-logged"
#define BAD_TOK "wrong-token-that-must-never-be-logged-either"
#define SERVICE "thingworx"

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
    char reasons[64][512];
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
    pid_t fixture;
    int port;
    char address[64];
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
    return -ESHUTDOWN; /* the consul plugin has no thread of its own */
}

static uint64_t host_now(const struct emx_host *h)
{
    return uv_now(h->loop);
}

/* Test versions of the core's parsers: a number with an optional unit. */
static int parse_unit(const char *text, uint64_t *out, const char *const *units,
                      const uint64_t *mul)
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

static int host_parse_size(const char *text, uint64_t *out)
{
    static const char *const u[] = {"KiB", "MiB", NULL};
    static const uint64_t m[] = {1024, 1024 * 1024};
    return parse_unit(text, out, u, m);
}

static int host_parse_duration(const char *text, uint64_t *out)
{
    static const char *const u[] = {"ms", "s", "m", NULL};
    static const uint64_t m[] = {1, 1000, 60000};
    return parse_unit(text, out, u, m);
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
    if (r->failures < 64)
        snprintf(r->reasons[r->failures], sizeof(r->reasons[0]), "%s", reason);
    r->failures++;
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

static void wait_update(struct fx *fx, int before)
{
    if (!wait_until(fx, updates_over, before, WAIT_MS))
        fail_msg("no update after %d (failures %d: %s)", before, fx->rec.failures, fx->rec.reason);
}

static void wait_failure(struct fx *fx, int before)
{
    if (!wait_until(fx, failures_over, before, WAIT_MS))
        fail_msg("no failure after %d", before);
}

static bool log_has(struct fx *fx, const char *needle)
{
    for (int i = 0; i < fx->rec.nlogs; i++)
        if (strstr(fx->rec.logs[i], needle))
            return true;
    return false;
}

static const struct rec_instance *find(struct fx *fx, const char *id)
{
    for (size_t i = 0; i < fx->rec.count; i++)
        if (strcmp(fx->rec.set[i].id, id) == 0)
            return &fx->rec.set[i];
    return NULL;
}

/* Neither token in any log line or failure reason the host collected. */
static void assert_no_token_logged(struct fx *fx)
{
    for (int i = 0; i < fx->rec.nlogs; i++)
        if (strstr(fx->rec.logs[i], TOKEN) || strstr(fx->rec.logs[i], BAD_TOK))
            fail_msg("token in log line: %s", fx->rec.logs[i]);
    for (int i = 0; i < fx->rec.failures && i < 64; i++)
        if (strstr(fx->rec.reasons[i], TOKEN) || strstr(fx->rec.reasons[i], BAD_TOK))
            fail_msg("token in reason: %s", fx->rec.reasons[i]);
}

/* ---- the fixture ---- */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void fixture_start(struct fx *fx)
{
    char port_file[PATH_MAX + 16];
    snprintf(port_file, sizeof(port_file), "%s/port", fx->dir);
    fx->fixture = fork();
    assert_true(fx->fixture >= 0);
    if (fx->fixture == 0) {
        if (chdir(fx->dir) == 0)
            execl(EMX_PYTHON3, "python3", EMX_CONSUL_FIXTURE, "--port-file", port_file,
                  "--lifetime", "150", (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 2000; i++) { /* Python starts slowly on a loaded machine */
        FILE *f = fopen(port_file, "r");
        if (f) {
            int ok = fscanf(f, "%d", &fx->port);
            fclose(f);
            if (ok == 1 && fx->port > 0) {
                snprintf(fx->address, sizeof(fx->address), "http://127.0.0.1:%d", fx->port);
                return;
            }
        }
        int status;
        if (waitpid(fx->fixture, &status, WNOHANG) == fx->fixture) {
            fx->fixture = 0;
            fail_msg("the fixture exited at start (status %d)", status);
        }
        sleep_ms(10);
    }
    fail_msg("the fixture wrote no port within 20 s");
}

/* One control request; returns the HTTP status and copies the body. */
static int control(struct fx *fx, const char *action, const char *body, char *out, size_t outsz)
{
    char req[4096], resp[65536];
    size_t blen = body ? strlen(body) : 0, got = 0;
    int n = snprintf(req, sizeof(req),
                     "POST /_fixture/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     action, blen, body ? body : "");
    assert_true(n > 0 && (size_t)n < sizeof(req));
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)fx->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(send(s, req, (size_t)n, MSG_NOSIGNAL), n);
    for (;;) {
        ssize_t r = recv(s, resp + got, sizeof(resp) - 1 - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
        if (got == sizeof(resp) - 1)
            break;
    }
    close(s);
    resp[got] = '\0';
    int status = 0;
    assert_int_equal(sscanf(resp, "HTTP/1.%*d %d", &status), 1);
    const char *b = strstr(resp, "\r\n\r\n");
    if (out && outsz)
        snprintf(out, outsz, "%s", b ? b + 4 : "");
    return status;
}

static void ctl(struct fx *fx, const char *action, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void ctl(struct fx *fx, const char *action, const char *fmt, ...)
{
    char body[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof(body), fmt, ap);
    va_end(ap);
    int st = control(fx, action, body, NULL, 0);
    if (st != 200)
        fail_msg("fixture %s: HTTP %d", action, st);
}

/* Registers node/id at 127.0.0.<n>; returns the service's new index. */
static long reg(struct fx *fx, const char *node, const char *id, int port, const char *extra)
{
    char body[2048], out[256];
    snprintf(body, sizeof(body),
             "{\"service\": \"" SERVICE "\", \"node\": \"%s\", \"id\": \"%s\", \"port\": %d,"
             " \"node_address\": \"10.0.0.9\", \"address\": \"127.0.0.%d\"%s%s}",
             node, id, port, port % 200 + 1, extra ? ", " : "", extra ? extra : "");
    assert_int_equal(control(fx, "register", body, out, sizeof(out)), 200);
    const char *p = strstr(out, "\"index\": ");
    assert_non_null(p);
    return strtol(p + 9, NULL, 10);
}

static long dereg(struct fx *fx, const char *id)
{
    char body[256], out[256];
    snprintf(body, sizeof(body), "{\"service\": \"" SERVICE "\", \"id\": \"%s\"}", id);
    assert_int_equal(control(fx, "deregister", body, out, sizeof(out)), 200);
    const char *p = strstr(out, "\"index\": ");
    assert_non_null(p);
    return strtol(p + 9, NULL, 10);
}

static void set_index(struct fx *fx, long index)
{
    ctl(fx, "index", "{\"service\": \"" SERVICE "\", \"index\": %ld}", index);
}

static long stat_num(struct fx *fx, const char *key)
{
    char out[65536], k[64];
    assert_int_equal(control(fx, "stats", "{}", out, sizeof(out)), 200);
    snprintf(k, sizeof(k), "\"%s\": ", key);
    const char *p = strstr(out, k);
    assert_non_null(p);
    if (strncmp(p + strlen(k), "true", 4) == 0)
        return 1;
    if (strncmp(p + strlen(k), "false", 5) == 0)
        return 0;
    return strtol(p + strlen(k), NULL, 10);
}

static void last_path(struct fx *fx, char *buf, size_t size)
{
    char out[65536];
    assert_int_equal(control(fx, "stats", "{}", out, sizeof(out)), 200);
    const char *p = strstr(out, "\"last_path\": \"");
    assert_non_null(p);
    p += 14;
    const char *e = strchr(p, '"');
    assert_non_null(e);
    snprintf(buf, size, "%.*s", (int)(e - p), p);
}

static void fixture_stop(struct fx *fx)
{
    if (fx->fixture <= 0)
        return;
    if (fx->port > 0)
        control(fx, "stop", "{}", NULL, 0);
    int status;
    for (int i = 0; i < 300; i++) {
        if (waitpid(fx->fixture, &status, WNOHANG) == fx->fixture) {
            fx->fixture = 0;
            return;
        }
        sleep_ms(10);
    }
    kill(fx->fixture, SIGKILL);
    waitpid(fx->fixture, &status, 0);
    fx->fixture = 0;
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
    assert_true(o->type == EMX_OPT_STRING || o->type == EMX_OPT_SECRET);
    memcpy((char *)fx->cfg + o->offset, &value, sizeof(value));
}

static void set_bool(struct fx *fx, const char *name, bool value)
{
    const struct emx_option *o = option(fx, name);
    assert_int_equal(o->type, EMX_OPT_BOOL);
    memcpy((char *)fx->cfg + o->offset, &value, sizeof(value));
}

static void set_u64(struct fx *fx, const char *name, uint64_t value)
{
    const struct emx_option *o = option(fx, name);
    assert_true(o->type == EMX_OPT_DURATION || o->type == EMX_OPT_SIZE);
    memcpy((char *)fx->cfg + o->offset, &value, sizeof(value));
}

/* Binds every default the way the core would. */
static void set_defaults(struct fx *fx)
{
    for (const struct emx_option *o = fx->d->options; o->name; o++) {
        uint64_t v = 0;
        if (!o->def)
            continue;
        switch (o->type) {
        case EMX_OPT_STRING:
            set_str(fx, o->name, o->def);
            break;
        case EMX_OPT_BOOL:
            assert_true(strcmp(o->def, "true") == 0 || strcmp(o->def, "false") == 0);
            set_bool(fx, o->name, strcmp(o->def, "true") == 0);
            break;
        case EMX_OPT_DURATION:
            assert_int_equal(host_parse_duration(o->def, &v), 0);
            set_u64(fx, o->name, v);
            break;
        case EMX_OPT_SIZE:
            assert_int_equal(host_parse_size(o->def, &v), 0);
            set_u64(fx, o->name, v);
            break;
        default:
            fail_msg("unexpected default type for %s", o->name);
        }
    }
}

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    assert_int_equal(uv_loop_init(&fx->loop), 0);

    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof(fx->dir), "%s/emx-consul-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    assert_non_null(mkdtemp(fx->dir));

    fx->dl = dlopen(EMX_CONSUL_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    if (!fx->dl)
        fail_msg("dlopen: %s", dlerror());
    fx->d = dlsym(fx->dl, EMX_DISCOVERY_SYMBOL);
    assert_non_null(fx->d);
    assert_int_equal(fx->d->hdr.magic, EMX_PLUGIN_MAGIC);
    assert_int_equal(fx->d->hdr.kind, EMX_PLUGIN_DISCOVERY);
    assert_string_equal(fx->d->hdr.name, "consul");

    fx->host = (struct emx_host){
        .struct_size = sizeof(struct emx_host),
        .abi_major = EMX_ABI_MAJOR,
        .abi_minor = EMX_ABI_MINOR,
        .tag = "discovery:consul.0",
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
    fixture_start(fx);
    set_str(fx, "address", fx->address);
    set_str(fx, "service", SERVICE);
    set_u64(fx, "wait", 10000);
    set_u64(fx, "min_interval", 50);
    set_u64(fx, "backoff_min", 100);
    set_u64(fx, "backoff_max", 400);
    set_u64(fx, "timeout", 2000);
    unsetenv("CONSUL_HTTP_TOKEN");
    unsetenv("CONSUL_HTTP_TOKEN_FILE");
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
static void finish(struct fx *fx)
{
    if (fx->inst) {
        fx->d->stop(fx->inst);
        fx->rec.stopped = true;
        fx->d->destroy(fx->inst);
        fx->inst = NULL;
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
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    assert_int_equal(fx->rec.calls_after_stop, 0);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    fixture_stop(fx);
    if (!fx->rec.stopped)
        finish(fx);
    assert_no_token_logged(fx);
    rec_clear_set(&fx->rec);
    free(fx->cfg);
    dlclose(fx->dl);
    nftw(fx->dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    unsetenv("CONSUL_HTTP_TOKEN");
    free(fx);
    return 0;
}

/* ---- tests ---- */

static void test_initial_set_and_changes(void **state)
{
    struct fx *fx = *state;
    char path[1024];
    reg(fx, "node-a", "tw-1", 8443,
        "\"weight\": 3, \"meta\": {\"edgemux-priority\": \"1\", \"edgemux-tls\": \"true\"}");
    reg(fx, "node-b", "tw-2", 8080, "\"address\": \"\"");
    start(fx);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 2);
    const struct rec_instance *a = find(fx, "node-a/tw-1"), *b = find(fx, "node-b/tw-2");
    assert_non_null(a);
    assert_non_null(b);
    assert_string_equal(a->host, "127.0.0.44");
    assert_int_equal(a->port, 8443);
    assert_int_equal(a->weight, 3);
    assert_int_equal(a->priority, 1);
    assert_true(a->tls);
    assert_string_equal(b->host, "10.0.0.9"); /* Service.Address empty: Node.Address */
    assert_int_equal(b->weight, 1);
    assert_int_equal(b->priority, 0);
    assert_false(b->tls);
    assert_string_equal(b->metadata, "node=node-b service=" SERVICE);
    assert_true(log_has(fx, "2 instances; added node-a/tw-1, node-b/tw-2"));

    /* The plugin now waits in a blocking query; a registration ends it. */
    run_for(fx, 300);
    assert_int_equal(stat_num(fx, "blocking"), 1);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "/v1/health/service/" SERVICE "?passing"));
    assert_non_null(strstr(path, "&wait=10000ms"));
    assert_non_null(strstr(path, "&index="));
    uint64_t t0 = uv_now(&fx->loop);
    reg(fx, "node-c", "tw-3", 8443, NULL);
    wait_update(fx, 1);
    assert_true(uv_now(&fx->loop) - t0 < 1000);
    assert_int_equal(fx->rec.count, 3);
    assert_non_null(find(fx, "node-c/tw-3"));
    assert_true(log_has(fx, "3 instances; added node-c/tw-3"));

    t0 = uv_now(&fx->loop);
    dereg(fx, "tw-1");
    wait_update(fx, 2);
    assert_true(uv_now(&fx->loop) - t0 < 1000);
    assert_int_equal(fx->rec.count, 2);
    assert_null(find(fx, "node-a/tw-1"));
    assert_true(log_has(fx, "removed node-a/tw-1"));

    /* A changed weight is a change of the same id. */
    reg(fx, "node-c", "tw-3", 8443, "\"weight\": 5");
    wait_update(fx, 3);
    assert_int_equal(find(fx, "node-c/tw-3")->weight, 5);
    assert_true(log_has(fx, "changed node-c/tw-3"));
    assert_int_equal(fx->rec.failures, 0);
    assert_int_equal(stat_num(fx, "token_in_query"), 0);
}

static int log_count(struct fx *fx, const char *needle)
{
    int n = 0;
    for (int i = 0; i < fx->rec.nlogs; i++)
        if (strstr(fx->rec.logs[i], needle))
            n++;
    return n;
}

static bool backwards_over(struct fx *fx, int n)
{
    return log_count(fx, "X-Consul-Index went backwards") > n;
}

static void test_index_backwards(void **state)
{
    struct fx *fx = *state;
    char path[1024];
    reg(fx, "node-a", "tw-1", 8443, NULL);
    start(fx);
    wait_update(fx, 0);
    run_for(fx, 200);

    /* The index falls (as when a server with an older raft log answers):
     * the index resets, a fresh non-blocking query follows, then blocking
     * queries from the new index. Nothing changed, so nothing is reported. */
    set_index(fx, 3);
    assert_true(wait_until(fx, backwards_over, 0, WAIT_MS));
    run_for(fx, 300);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&index=3&"));
    assert_int_equal(fx->rec.updates, 1);

    /* The index falls again together with a change: the answer that went
     * backwards is not trusted, the fresh query brings the new set. */
    reg(fx, "node-b", "tw-2", 8443, "\"index\": 2");
    wait_update(fx, 1);
    assert_int_equal(log_count(fx, "X-Consul-Index went backwards"), 2);
    assert_int_equal(fx->rec.count, 2);
    assert_non_null(find(fx, "node-a/tw-1"));
    assert_non_null(find(fx, "node-b/tw-2"));

    /* From the reset index on, blocking queries see changes again. */
    run_for(fx, 200);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&index=2&"));
    reg(fx, "node-c", "tw-3", 8443, NULL);
    wait_update(fx, 2);
    assert_int_equal(fx->rec.count, 3);

    /* Index 0 from a buggy server is never sent back as index=0. */
    set_index(fx, 0);
    run_for(fx, 300);
    last_path(fx, path, sizeof(path));
    assert_null(strstr(path, "index=0"));
    assert_int_equal(fx->rec.failures, 0);
    assert_int_equal(fx->rec.count, 3);
}

static void test_server_errors_backoff(void **state)
{
    struct fx *fx = *state;
    long idx = reg(fx, "node-a", "tw-1", 8443, NULL);
    set_u64(fx, "backoff_min", 200);
    set_u64(fx, "backoff_max", 800);
    start(fx);
    wait_update(fx, 0);
    run_for(fx, 100);

    /* Every query fails from now on; wake the blocking one. */
    ctl(fx, "fail", "{\"count\": 100000, \"status\": 500}");
    ctl(fx, "reset_stats", "{}");
    set_index(fx, idx + 1);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, "HTTP 500"));
    assert_non_null(strstr(fx->rec.reason, "No cluster leader"));
    run_for(fx, 3000);
    /* 200ms doubling to 800ms, jittered over the upper half: at most about
     * 1+2+3+... a hot loop would make hundreds. */
    long q = stat_num(fx, "queries");
    assert_true(q >= 3);
    assert_true(q <= 10);
    assert_true(fx->rec.failures >= 3);
    assert_true(fx->rec.failures >= q - 1 && fx->rec.failures <= q); /* each query failed */
    /* The last good set stays: no update, no empty set. */
    assert_int_equal(fx->rec.updates, 1);
    assert_int_equal(fx->rec.count, 1);

    /* The source recovers: the next retry reports the set again. */
    ctl(fx, "fail", "{\"count\": 0}");
    wait_update(fx, 1);
    assert_int_equal(fx->rec.count, 1);
    assert_true(log_has(fx, "consul answers again"));
}

static void test_refused_and_timeout(void **state)
{
    struct fx *fx = *state;
    /* A port nobody listens on: bound, then closed. */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &sl), 0);
    char refused[64];
    snprintf(refused, sizeof(refused), "http://127.0.0.1:%d", ntohs(sa.sin_port));
    close(s);
    set_str(fx, "address", refused);
    start(fx);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, refused));
    wait_failure(fx, 1); /* retried */
    assert_int_equal(fx->rec.updates, 0);
    fx->d->stop(fx->inst);
    fx->d->destroy(fx->inst);
    fx->inst = NULL;
    run_for(fx, 50);

    /* An answer that never comes is a timeout. */
    int before = fx->rec.failures;
    reg(fx, "node-a", "tw-1", 8443, NULL);
    ctl(fx, "mode", "{\"hang_ms\": 3000}");
    set_str(fx, "address", fx->address);
    set_u64(fx, "timeout", 300);
    start(fx);
    wait_failure(fx, before);
    assert_non_null(strstr(fx->rec.reason, "timed out"));
    assert_int_equal(fx->rec.updates, 0);
    ctl(fx, "mode", "{\"hang_ms\": 0}");
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 1);
}

static void test_bad_answers(void **state)
{
    struct fx *fx = *state;
    long idx = reg(fx, "node-a", "tw-1", 8443, NULL);
    start(fx);
    wait_update(fx, 0);
    run_for(fx, 100);

    ctl(fx, "mode", "{\"body\": \"[{\\\"Node\\\": \"}");
    set_index(fx, ++idx);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, "bad answer: bad JSON"));

    ctl(fx, "mode", "{\"body\": \"[{\\\"Node\\\": {}, \\\"Service\\\": {}}]\"}");
    wait_until(fx, NULL, 0, 0);
    int f = fx->rec.failures;
    wait_failure(fx, f);
    assert_non_null(strstr(fx->rec.reason, "entry 0: Node.Node missing"));

    ctl(fx, "mode", "{\"body\": null, \"index_header\": \"missing\"}");
    f = fx->rec.failures;
    wait_failure(fx, f);
    wait_failure(fx, f + 1);
    assert_non_null(strstr(fx->rec.reason, "X-Consul-Index"));
    ctl(fx, "mode", "{\"index_header\": \"garbage\"}");
    f = fx->rec.failures;
    wait_failure(fx, f + 1);
    assert_non_null(strstr(fx->rec.reason, "X-Consul-Index"));

    /* Throughout, the last good set stood. */
    assert_int_equal(fx->rec.updates, 1);
    assert_int_equal(fx->rec.count, 1);
    ctl(fx, "mode", "{\"index_header\": \"ok\"}");
    wait_update(fx, 1);
    assert_int_equal(fx->rec.count, 1);
}

static void write_token_file(struct fx *fx, const char *name, const char *text, char *path,
                             size_t size)
{
    snprintf(path, size, "%s/%s", fx->dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
    chmod(path, 0600);
}

static void test_token(void **state)
{
    struct fx *fx = *state;
    char good[PATH_MAX + 32], bad[PATH_MAX + 32];
    reg(fx, "node-a", "tw-1", 8443, NULL);
    ctl(fx, "token", "{\"token\": \"" TOKEN "\"}");

    /* No token: 403, reported as a failure. */
    start(fx);
    wait_failure(fx, 0);
    assert_non_null(strstr(fx->rec.reason, "HTTP 403"));
    assert_non_null(strstr(fx->rec.reason, "ACL"));
    fx->d->stop(fx->inst);
    fx->d->destroy(fx->inst);
    fx->inst = NULL;

    /* The right token from token_file. */
    write_token_file(fx, "token", TOKEN "\n", good, sizeof(good));
    set_str(fx, "token_file", good);
    start(fx);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 1);
    fx->d->stop(fx->inst);
    fx->d->destroy(fx->inst);
    fx->inst = NULL;

    /* A wrong token: failure, and its reason names no token. */
    int f = fx->rec.failures;
    write_token_file(fx, "bad", BAD_TOK, bad, sizeof(bad));
    set_str(fx, "token_file", bad);
    start(fx);
    wait_failure(fx, f);
    assert_non_null(strstr(fx->rec.reason, "HTTP 403"));
    assert_int_equal(fx->rec.updates, 1);
    fx->d->stop(fx->inst);
    fx->d->destroy(fx->inst);
    fx->inst = NULL;

    /* From the environment when no token_file is set. */
    set_str(fx, "token_file", NULL);
    setenv("CONSUL_HTTP_TOKEN", TOKEN, 1);
    start(fx);
    wait_update(fx, 1);
    unsetenv("CONSUL_HTTP_TOKEN");

    /* A token that would split the header is refused at create. */
    void *inst = NULL;
    write_token_file(fx, "split", "abc\r\nX-Evil: 1\n", bad, sizeof(bad));
    set_str(fx, "token_file", bad);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    set_str(fx, "token_file", "/nonexistent/token");
    assert_true(fx->d->create(&fx->host, fx->cfg, &inst) < 0);
    assert_null(inst);

    assert_int_equal(stat_num(fx, "token_in_query"), 0);
    assert_no_token_logged(fx);
}

static void test_rate_limit(void **state)
{
    struct fx *fx = *state;
    reg(fx, "node-a", "tw-1", 8443, NULL);
    /* A server that ignores index and answers at once. */
    ctl(fx, "mode", "{\"instant\": true}");
    set_u64(fx, "min_interval", 400);
    start(fx);
    wait_update(fx, 0);
    ctl(fx, "reset_stats", "{}");
    run_for(fx, 2000);
    long q = stat_num(fx, "queries");
    /* 2 s / 400 ms = 5, plus one at the edge of the window. */
    assert_true(q >= 3);
    assert_true(q <= 6);
    assert_int_equal(fx->rec.updates, 1); /* unchanged answers report nothing */
    assert_int_equal(fx->rec.failures, 0);
    assert_true(log_has(fx, "unchanged"));
}

static void test_empty_answer_and_tag(void **state)
{
    struct fx *fx = *state;
    char path[1024];
    /* A service without instances is an answer: an empty set. */
    start(fx);
    wait_update(fx, 0);
    assert_int_equal(fx->rec.count, 0);
    assert_int_equal(fx->rec.failures, 0);
    reg(fx, "node-a", "tw-1", 8443, NULL);
    wait_update(fx, 1);
    assert_int_equal(fx->rec.count, 1);
    dereg(fx, "tw-1");
    wait_update(fx, 2);
    assert_int_equal(fx->rec.count, 0);
    fx->d->stop(fx->inst);
    fx->d->destroy(fx->inst);
    fx->inst = NULL;

    /* Only instances with the tag; the tag and dc go to Consul. */
    reg(fx, "node-a", "tw-1", 8443, "\"tags\": [\"edge\", \"v2\"]");
    reg(fx, "node-b", "tw-2", 8443, "\"tags\": [\"v2\"]");
    set_str(fx, "tag", "edge");
    set_str(fx, "datacenter", "dc1");
    start(fx);
    wait_update(fx, 3);
    assert_int_equal(fx->rec.count, 1);
    assert_non_null(find(fx, "node-a/tw-1"));
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&tag=edge&dc=dc1"));
}

static void test_create_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    set_str(fx, "service", NULL);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    set_str(fx, "service", SERVICE);
    set_str(fx, "address", "127.0.0.1:8500");
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    set_str(fx, "address", fx->address);
    set_u64(fx, "wait", 11 * 60 * 1000);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    set_u64(fx, "wait", 10000);
    set_u64(fx, "backoff_max", 10);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), -EINVAL);
    assert_null(inst);
    /* destroy without start frees at once: nothing was given to libuv. */
    set_u64(fx, "backoff_max", 400);
    assert_int_equal(fx->d->create(&fx->host, fx->cfg, &inst), 0);
    fx->d->destroy(inst);
    assert_false(uv_loop_alive(&fx->loop));
}

/* Stopping while a blocking query is held by the server closes everything. */
static void test_stop_during_blocking_query(void **state)
{
    struct fx *fx = *state;
    reg(fx, "node-a", "tw-1", 8443, NULL);
    start(fx);
    wait_update(fx, 0);
    run_for(fx, 200);
    assert_int_equal(stat_num(fx, "blocking"), 1);
    finish(fx);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_initial_set_and_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_index_backwards, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_errors_backoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_and_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_answers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_token, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_answer_and_tag, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_during_blocking_query, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
