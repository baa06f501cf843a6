/* The built emx-discovery-consul.so, loaded with dlopen against the host table
 * of tests/integration/common and run against consul_fixture.py: initial set, changes
 * seen through blocking queries, an index that goes backwards, HTTP errors
 * with backoff, refused connections and timeouts, bad answers, ACL tokens
 * (which must never reach a log line), the rate limit, empty answers and
 * tag filtering. Every wait is bounded by a uv timer or a socket timeout. */
#include <arpa/inet.h>
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
#include "test_host.h"

#define WAIT_MS 10000 /* bound of every wait for something that must happen (loaded CI) */
#define LOG_MAX 512
#define SET_MAX 16
#define TOKEN   "b0b5e1c2-token-that-must-never-be-logged"
#define BAD_TOK "wrong-token-that-must-never-be-logged-either"
#define SERVICE "thingworx"

struct fx {
    struct th_host th;
    char dir[PATH_MAX];
    pid_t fixture;
    int port;
    char address[64];
};

/* Test versions of the core's parsers: a number with an optional unit. */
static int host_parse_size(const char *text, uint64_t *out)
{
    static const char *const u[] = {"KiB", "MiB", NULL};
    static const uint64_t m[] = {1024, 1024 * 1024};
    return th_parse_unit(text, out, u, m);
}

static int host_parse_duration(const char *text, uint64_t *out)
{
    static const char *const u[] = {"ms", "s", "m", NULL};
    static const uint64_t m[] = {1, 1000, 60000};
    return th_parse_unit(text, out, u, m);
}

/* Neither token in any log line or failure reason the host collected. */
static void assert_no_token_logged(struct fx *fx)
{
    for (int i = 0; i < fx->th.rec.nlogs; i++)
        if (strstr(th_log(&fx->th, i), TOKEN) || strstr(th_log(&fx->th, i), BAD_TOK))
            fail_msg("token in log line: %s", th_log(&fx->th, i));
    for (int i = 0; i < fx->th.rec.failures && i < 64; i++)
        if (strstr(fx->th.rec.reasons[i], TOKEN) || strstr(fx->th.rec.reasons[i], BAD_TOK))
            fail_msg("token in reason: %s", fx->th.rec.reasons[i]);
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

/* Binds every default the way the core would. */
static void set_defaults(struct fx *fx)
{
    for (const struct emx_option *o = fx->th.d->options; o->name; o++) {
        uint64_t v = 0;
        if (!o->def)
            continue;
        switch (o->type) {
        case EMX_OPT_STRING:
            th_set_str(&fx->th, o->name, o->def);
            break;
        case EMX_OPT_BOOL:
            assert_true(strcmp(o->def, "true") == 0 || strcmp(o->def, "false") == 0);
            th_set_bool(&fx->th, o->name, strcmp(o->def, "true") == 0);
            break;
        case EMX_OPT_DURATION:
            assert_int_equal(host_parse_duration(o->def, &v), 0);
            th_set_u64(&fx->th, o->name, v);
            break;
        case EMX_OPT_SIZE:
            assert_int_equal(host_parse_size(o->def, &v), 0);
            th_set_u64(&fx->th, o->name, v);
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
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof(fx->dir), "%s/emx-consul-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    assert_non_null(mkdtemp(fx->dir));

    const struct th_config conf = {
        .plugin = EMX_CONSUL_PLUGIN,
        .name = "consul",
        .set_max = SET_MAX,
        .log_max = LOG_MAX,
        .log_len = 640,
        .line_len = 600,
        .parse_size = host_parse_size,
        .parse_duration = host_parse_duration,
    };
    th_open(&fx->th, &conf, fx);
    set_defaults(fx);
    fixture_start(fx);
    th_set_str(&fx->th, "address", fx->address);
    th_set_str(&fx->th, "service", SERVICE);
    th_set_u64(&fx->th, "wait", 10000);
    th_set_u64(&fx->th, "min_interval", 50);
    th_set_u64(&fx->th, "backoff_min", 100);
    th_set_u64(&fx->th, "backoff_max", 400);
    th_set_u64(&fx->th, "timeout", 2000);
    unsetenv("CONSUL_HTTP_TOKEN");
    unsetenv("CONSUL_HTTP_TOKEN_FILE");
    *state = fx;
    return 0;
}

/* stop, let libuv close every handle, destroy: the loop must then close. */
static void finish(struct fx *fx)
{
    th_stop(&fx->th, true);
    /* An unreferenced deadline: the loop ends when the plugin let go. */
    th_await_idle(&fx->th, WAIT_MS);
    th_close_loop(&fx->th);
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
    if (!fx->th.rec.stopped)
        finish(fx);
    assert_no_token_logged(fx);
    th_close(&fx->th);
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
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    const struct th_instance *a = th_find(&fx->th, "node-a/tw-1"),
                             *b = th_find(&fx->th, "node-b/tw-2");
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
    assert_true(th_log_has(&fx->th, "2 instances; added node-a/tw-1, node-b/tw-2"));

    /* The plugin now waits in a blocking query; a registration ends it. */
    th_run_for(&fx->th, 300);
    assert_int_equal(stat_num(fx, "blocking"), 1);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "/v1/health/service/" SERVICE "?passing"));
    assert_non_null(strstr(path, "&wait=10000ms"));
    assert_non_null(strstr(path, "&index="));
    uint64_t t0 = uv_now(&fx->th.loop);
    reg(fx, "node-c", "tw-3", 8443, NULL);
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_true(uv_now(&fx->th.loop) - t0 < 1000);
    assert_int_equal(fx->th.rec.count, 3);
    assert_non_null(th_find(&fx->th, "node-c/tw-3"));
    assert_true(th_log_has(&fx->th, "3 instances; added node-c/tw-3"));

    t0 = uv_now(&fx->th.loop);
    dereg(fx, "tw-1");
    th_wait_update(&fx->th, 2, WAIT_MS);
    assert_true(uv_now(&fx->th.loop) - t0 < 1000);
    assert_int_equal(fx->th.rec.count, 2);
    assert_null(th_find(&fx->th, "node-a/tw-1"));
    assert_true(th_log_has(&fx->th, "removed node-a/tw-1"));

    /* A changed weight is a change of the same id. */
    reg(fx, "node-c", "tw-3", 8443, "\"weight\": 5");
    th_wait_update(&fx->th, 3, WAIT_MS);
    assert_int_equal(th_find(&fx->th, "node-c/tw-3")->weight, 5);
    assert_true(th_log_has(&fx->th, "changed node-c/tw-3"));
    assert_int_equal(fx->th.rec.failures, 0);
    assert_int_equal(stat_num(fx, "token_in_query"), 0);
}

static bool backwards_over(struct th_host *th, long n)
{
    return th_log_count(th, "X-Consul-Index went backwards") > n;
}

static void test_index_backwards(void **state)
{
    struct fx *fx = *state;
    char path[1024];
    reg(fx, "node-a", "tw-1", 8443, NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    th_run_for(&fx->th, 200);

    /* The index falls (as when a server with an older raft log answers):
     * the index resets, a fresh non-blocking query follows, then blocking
     * queries from the new index. Nothing changed, so nothing is reported. */
    set_index(fx, 3);
    assert_true(th_wait_until(&fx->th, backwards_over, 0, WAIT_MS));
    th_run_for(&fx->th, 300);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&index=3&"));
    assert_int_equal(fx->th.rec.updates, 1);

    /* The index falls again together with a change: the answer that went
     * backwards is not trusted, the fresh query brings the new set. */
    reg(fx, "node-b", "tw-2", 8443, "\"index\": 2");
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_int_equal(th_log_count(&fx->th, "X-Consul-Index went backwards"), 2);
    assert_int_equal(fx->th.rec.count, 2);
    assert_non_null(th_find(&fx->th, "node-a/tw-1"));
    assert_non_null(th_find(&fx->th, "node-b/tw-2"));

    /* From the reset index on, blocking queries see changes again. */
    th_run_for(&fx->th, 200);
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&index=2&"));
    reg(fx, "node-c", "tw-3", 8443, NULL);
    th_wait_update(&fx->th, 2, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);

    /* Index 0 from a buggy server is never sent back as index=0. */
    set_index(fx, 0);
    th_run_for(&fx->th, 300);
    last_path(fx, path, sizeof(path));
    assert_null(strstr(path, "index=0"));
    assert_int_equal(fx->th.rec.failures, 0);
    assert_int_equal(fx->th.rec.count, 3);
}

static void test_server_errors_backoff(void **state)
{
    struct fx *fx = *state;
    long idx = reg(fx, "node-a", "tw-1", 8443, NULL);
    th_set_u64(&fx->th, "backoff_min", 200);
    th_set_u64(&fx->th, "backoff_max", 800);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    th_run_for(&fx->th, 100);

    /* Every query fails from now on; wake the blocking one. */
    ctl(fx, "fail", "{\"count\": 100000, \"status\": 500}");
    ctl(fx, "reset_stats", "{}");
    set_index(fx, idx + 1);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "HTTP 500"));
    assert_non_null(strstr(fx->th.rec.reason, "No cluster leader"));
    th_run_for(&fx->th, 3000);
    /* 200ms doubling to 800ms, jittered over the upper half: at most about
     * 1+2+3+... a hot loop would make hundreds. */
    long q = stat_num(fx, "queries");
    assert_true(q >= 3);
    assert_true(q <= 10);
    assert_true(fx->th.rec.failures >= 3);
    assert_true(fx->th.rec.failures >= q - 1 && fx->th.rec.failures <= q); /* each query failed */
    /* The last good set stays: no update, no empty set. */
    assert_int_equal(fx->th.rec.updates, 1);
    assert_int_equal(fx->th.rec.count, 1);

    /* The source recovers: the next retry reports the set again. */
    ctl(fx, "fail", "{\"count\": 0}");
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_true(th_log_has(&fx->th, "consul answers again"));
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
    th_set_str(&fx->th, "address", refused);
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, refused));
    th_wait_failure(&fx->th, 1, WAIT_MS); /* retried */
    assert_int_equal(fx->th.rec.updates, 0);
    fx->th.d->stop(fx->th.inst);
    fx->th.d->destroy(fx->th.inst);
    fx->th.inst = NULL;
    th_run_for(&fx->th, 50);

    /* An answer that never comes is a timeout. */
    int before = fx->th.rec.failures;
    reg(fx, "node-a", "tw-1", 8443, NULL);
    ctl(fx, "mode", "{\"hang_ms\": 3000}");
    th_set_str(&fx->th, "address", fx->address);
    th_set_u64(&fx->th, "timeout", 300);
    th_start(&fx->th);
    th_wait_failure(&fx->th, before, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "timed out"));
    assert_int_equal(fx->th.rec.updates, 0);
    ctl(fx, "mode", "{\"hang_ms\": 0}");
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
}

static void test_bad_answers(void **state)
{
    struct fx *fx = *state;
    long idx = reg(fx, "node-a", "tw-1", 8443, NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    th_run_for(&fx->th, 100);

    ctl(fx, "mode", "{\"body\": \"[{\\\"Node\\\": \"}");
    set_index(fx, ++idx);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "bad answer: bad JSON"));

    ctl(fx, "mode", "{\"body\": \"[{\\\"Node\\\": {}, \\\"Service\\\": {}}]\"}");
    th_wait_until(&fx->th, NULL, 0, 0);
    int f = fx->th.rec.failures;
    th_wait_failure(&fx->th, f, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "entry 0: Node.Node missing"));

    ctl(fx, "mode", "{\"body\": null, \"index_header\": \"missing\"}");
    f = fx->th.rec.failures;
    th_wait_failure(&fx->th, f, WAIT_MS);
    th_wait_failure(&fx->th, f + 1, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "X-Consul-Index"));
    ctl(fx, "mode", "{\"index_header\": \"garbage\"}");
    f = fx->th.rec.failures;
    th_wait_failure(&fx->th, f + 1, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "X-Consul-Index"));

    /* Throughout, the last good set stood. */
    assert_int_equal(fx->th.rec.updates, 1);
    assert_int_equal(fx->th.rec.count, 1);
    ctl(fx, "mode", "{\"index_header\": \"ok\"}");
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
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
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "HTTP 403"));
    assert_non_null(strstr(fx->th.rec.reason, "ACL"));
    fx->th.d->stop(fx->th.inst);
    fx->th.d->destroy(fx->th.inst);
    fx->th.inst = NULL;

    /* The right token from token_file. */
    write_token_file(fx, "token", TOKEN "\n", good, sizeof(good));
    th_set_str(&fx->th, "token_file", good);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    fx->th.d->stop(fx->th.inst);
    fx->th.d->destroy(fx->th.inst);
    fx->th.inst = NULL;

    /* A wrong token: failure, and its reason names no token. */
    int f = fx->th.rec.failures;
    write_token_file(fx, "bad", BAD_TOK, bad, sizeof(bad));
    th_set_str(&fx->th, "token_file", bad);
    th_start(&fx->th);
    th_wait_failure(&fx->th, f, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "HTTP 403"));
    assert_int_equal(fx->th.rec.updates, 1);
    fx->th.d->stop(fx->th.inst);
    fx->th.d->destroy(fx->th.inst);
    fx->th.inst = NULL;

    /* From the environment when no token_file is set. */
    th_set_str(&fx->th, "token_file", NULL);
    setenv("CONSUL_HTTP_TOKEN", TOKEN, 1);
    th_start(&fx->th);
    th_wait_update(&fx->th, 1, WAIT_MS);
    unsetenv("CONSUL_HTTP_TOKEN");

    /* A token that would split the header is refused at create. */
    void *inst = NULL;
    write_token_file(fx, "split", "abc\r\nX-Evil: 1\n", bad, sizeof(bad));
    th_set_str(&fx->th, "token_file", bad);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    th_set_str(&fx->th, "token_file", "/nonexistent/token");
    assert_true(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst) < 0);
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
    th_set_u64(&fx->th, "min_interval", 400);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    ctl(fx, "reset_stats", "{}");
    th_run_for(&fx->th, 2000);
    long q = stat_num(fx, "queries");
    /* 2 s / 400 ms = 5, plus one at the edge of the window. */
    assert_true(q >= 3);
    assert_true(q <= 6);
    assert_int_equal(fx->th.rec.updates, 1); /* unchanged answers report nothing */
    assert_int_equal(fx->th.rec.failures, 0);
    assert_true(th_log_has(&fx->th, "unchanged"));
}

static void test_empty_answer_and_tag(void **state)
{
    struct fx *fx = *state;
    char path[1024];
    /* A service without instances is an answer: an empty set. */
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    reg(fx, "node-a", "tw-1", 8443, NULL);
    th_wait_update(&fx->th, 1, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    dereg(fx, "tw-1");
    th_wait_update(&fx->th, 2, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    fx->th.d->stop(fx->th.inst);
    fx->th.d->destroy(fx->th.inst);
    fx->th.inst = NULL;

    /* Only instances with the tag; the tag and dc go to Consul. */
    reg(fx, "node-a", "tw-1", 8443, "\"tags\": [\"edge\", \"v2\"]");
    reg(fx, "node-b", "tw-2", 8443, "\"tags\": [\"v2\"]");
    th_set_str(&fx->th, "tag", "edge");
    th_set_str(&fx->th, "datacenter", "dc1");
    th_start(&fx->th);
    th_wait_update(&fx->th, 3, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "node-a/tw-1"));
    last_path(fx, path, sizeof(path));
    assert_non_null(strstr(path, "&tag=edge&dc=dc1"));
}

static void test_create_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    th_set_str(&fx->th, "service", NULL);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    th_set_str(&fx->th, "service", SERVICE);
    th_set_str(&fx->th, "address", "127.0.0.1:8500");
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    th_set_str(&fx->th, "address", fx->address);
    th_set_u64(&fx->th, "wait", 11 * 60 * 1000);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    th_set_u64(&fx->th, "wait", 10000);
    th_set_u64(&fx->th, "backoff_max", 10);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    assert_null(inst);
    /* destroy without start frees at once: nothing was given to libuv. */
    th_set_u64(&fx->th, "backoff_max", 400);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), 0);
    fx->th.d->destroy(inst);
    assert_false(uv_loop_alive(&fx->th.loop));
}

/* Stopping while a blocking query is held by the server closes everything. */
static void test_stop_during_blocking_query(void **state)
{
    struct fx *fx = *state;
    reg(fx, "node-a", "tw-1", 8443, NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    th_run_for(&fx->th, 200);
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
