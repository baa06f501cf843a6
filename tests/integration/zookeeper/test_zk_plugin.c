/* The built emx-discovery-zookeeper.so, loaded with dlopen against a host
 * table of tests/integration/common, watching a real ZooKeeper server that this
 * program starts once (standalone, loopback, free port, data in a temp dir)
 * from Debian's zookeeper package. The test registers and removes platforms
 * itself with ephemeral znodes through libzookeeper-mt, as Curator does.
 * Every wait is bounded; the server dies with this process (PDEATHSIG). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>
#include <zookeeper/zookeeper.h>

#include <cmocka.h>

#include "edgemux/discovery.h"
#include "test_host.h"

#define WAIT_MS     10000 /* bound of every wait for something that must happen */
#define PROMPT_MS   1000  /* a change at the source reaches the core within this */
#define START_MS    30000 /* the JVM starting the server */
#define LOG_MAX     512
#define SET_MAX     16
#define SECRET      "s3cret-pw"
#define REG_TIMEOUT 30000 /* the test's own sessions outlive every outage it makes */

/* ---- the server ---- */

static struct {
    pid_t pid;
    int port;
    char dir[PATH_MAX];
    char cfg[PATH_MAX + 32];
    char out[PATH_MAX + 32];
    char hostport[64];
} srv = {.pid = -1};

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static bool port_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (fd >= 0)
        close(fd);
    return ok;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void quiet(const char *msg)
{
    (void)msg;
}

/* Returns 0 once the server accepts, 77 when java cannot run here, -1. */
static int server_start(void)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a crashed test */
        setpgid(0, 0);
        int fd = open(srv.out, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execlp("java", "java", "-Xms32m", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-Dzookeeper.admin.enableServer=false", "-cp", EMX_ZOOKEEPER_JAR,
               "org.apache.zookeeper.server.quorum.QuorumPeerMain", srv.cfg, (char *)NULL);
        _exit(127);
    }
    srv.pid = pid;
    uint64_t end = mono_ms() + START_MS;
    while (mono_ms() < end) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            srv.pid = -1;
            fprintf(stderr, "zookeeper server exited (status %d); see %s\n", st, srv.out);
            return WIFEXITED(st) && WEXITSTATUS(st) == 127 ? 77 : -1;
        }
        if (port_open(srv.port))
            break;
        sleep_ms(50);
    }
    /* The port opens before the database is loaded: ready means a session. */
    zhandle_t *zh = zookeeper_init2(srv.hostport, NULL, REG_TIMEOUT, NULL, NULL, 0, quiet);
    if (!zh)
        return -1;
    while (zoo_state(zh) != ZOO_CONNECTED_STATE && mono_ms() < end)
        sleep_ms(50);
    bool up = zoo_state(zh) == ZOO_CONNECTED_STATE;
    zookeeper_close(zh);
    if (!up)
        fprintf(stderr, "zookeeper server not ready after %d ms; see %s\n", START_MS, srv.out);
    return up ? 0 : -1;
}

static void server_stop(void)
{
    if (srv.pid <= 0)
        return;
    kill(srv.pid, SIGCONT);
    kill(srv.pid, SIGTERM);
    uint64_t end = mono_ms() + 10000;
    int st;
    while (waitpid(srv.pid, &st, WNOHANG) == 0) {
        if (mono_ms() > end) {
            kill(srv.pid, SIGKILL);
            waitpid(srv.pid, &st, 0);
            break;
        }
        sleep_ms(20);
    }
    srv.pid = -1;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state)
{
    (void)state;
    if (access(EMX_ZOOKEEPER_JAR, R_OK) != 0) {
        fprintf(stderr, "skipped: %s not found (install the zookeeper package)\n",
                EMX_ZOOKEEPER_JAR);
        exit(77);
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(srv.dir, sizeof(srv.dir), "%s/emx-zk-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(srv.dir))
        return -1;
    snprintf(srv.cfg, sizeof(srv.cfg), "%s/zoo.cfg", srv.dir);
    snprintf(srv.out, sizeof(srv.out), "%s/server.out", srv.dir);
    srv.port = free_port();
    snprintf(srv.hostport, sizeof(srv.hostport), "127.0.0.1:%d", srv.port);
    FILE *f = fopen(srv.cfg, "w");
    if (!f || srv.port <= 0)
        return -1;
    fprintf(f,
            "tickTime=500\n"
            "dataDir=%s/data\n"
            "clientPort=%d\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "minSessionTimeout=1000\n"
            "maxSessionTimeout=60000\n",
            srv.dir, srv.port);
    fclose(f);
    zoo_set_debug_level(ZOO_LOG_LEVEL_ERROR);
    int rc = server_start();
    if (rc == 77)
        exit(77);
    return rc;
}

static int group_teardown(void **state)
{
    (void)state;
    server_stop();
    if (getenv("EMX_TEST_KEEP"))
        fprintf(stderr, "kept %s\n", srv.dir);
    else
        nftw(srv.dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* ---- a TCP relay between the plugin and the server ----
 * Cutting it (every connection closed, new ones refused) longer than the
 * plugin's session timeout makes the server expire that session while it
 * keeps serving the test's own sessions: a deterministic expiry. */

#define RELAY_PAIRS 8

static struct {
    int lfd, port;
    int fds[RELAY_PAIRS][2]; /* client, server; -1: unused */
    pthread_t thread;
    volatile int cut, quit; /* set by the test thread */
    bool running;
} relay;

static void relay_close_pair(int i)
{
    for (int j = 0; j < 2; j++)
        if (relay.fds[i][j] >= 0) {
            close(relay.fds[i][j]);
            relay.fds[i][j] = -1;
        }
}

static int relay_connect_server(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)srv.port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
        return fd;
    if (fd >= 0)
        close(fd);
    return -1;
}

static void *relay_main(void *arg)
{
    (void)arg;
    while (!relay.quit) {
        struct pollfd pf[1 + RELAY_PAIRS * 2];
        int map[1 + RELAY_PAIRS * 2][2];
        int n = 0;
        pf[n++] = (struct pollfd){.fd = relay.lfd, .events = POLLIN};
        for (int i = 0; i < RELAY_PAIRS; i++) {
            if (relay.cut)
                relay_close_pair(i);
            for (int j = 0; j < 2; j++)
                if (relay.fds[i][j] >= 0) {
                    map[n][0] = i;
                    map[n][1] = j;
                    pf[n++] = (struct pollfd){.fd = relay.fds[i][j], .events = POLLIN};
                }
        }
        if (poll(pf, (nfds_t)n, 50) <= 0)
            continue;
        if (pf[0].revents & POLLIN) {
            int c = accept(relay.lfd, NULL, NULL);
            int slot = -1;
            for (int i = 0; i < RELAY_PAIRS && slot < 0; i++)
                if (relay.fds[i][0] < 0)
                    slot = i;
            int sfd = c >= 0 && !relay.cut && slot >= 0 ? relay_connect_server() : -1;
            if (sfd < 0) {
                if (c >= 0)
                    close(c);
            } else {
                relay.fds[slot][0] = c;
                relay.fds[slot][1] = sfd;
            }
        }
        for (int k = 1; k < n; k++) {
            if (!pf[k].revents)
                continue;
            int i = map[k][0], j = map[k][1];
            char buf[16384];
            ssize_t got = relay.fds[i][j] >= 0 ? read(relay.fds[i][j], buf, sizeof(buf)) : -1;
            if (got <= 0 || send(relay.fds[i][1 - j], buf, (size_t)got, MSG_NOSIGNAL) != got)
                relay_close_pair(i);
        }
    }
    for (int i = 0; i < RELAY_PAIRS; i++)
        relay_close_pair(i);
    return NULL;
}

static void relay_start(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    memset(relay.fds, -1, sizeof(relay.fds));
    relay.cut = relay.quit = 0;
    relay.lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(relay.lfd >= 0);
    assert_int_equal(bind(relay.lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(relay.lfd, 16), 0);
    assert_int_equal(getsockname(relay.lfd, (struct sockaddr *)&a, &len), 0);
    relay.port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&relay.thread, NULL, relay_main, NULL), 0);
    relay.running = true;
}

static void relay_stop(void)
{
    if (!relay.running)
        return;
    relay.running = false;
    relay.quit = 1;
    pthread_join(relay.thread, NULL);
    close(relay.lfd);
}

/* ---- the test's own ZooKeeper client: registering platforms ---- */

static void reg_watcher(zhandle_t *zh, int type, int state, const char *path, void *ctx)
{
    (void)zh;
    (void)type;
    (void)state;
    (void)path;
    (void)ctx;
}

/* The library's complaints about outages the tests make on purpose. */
static void reg_log(const char *msg)
{
    if (getenv("EMX_TEST_VERBOSE"))
        fprintf(stderr, "[registrar] %s\n", msg);
}

static zhandle_t *reg_open(void)
{
    zhandle_t *zh = zookeeper_init2(srv.hostport, reg_watcher, REG_TIMEOUT, NULL, NULL, 0, reg_log);
    assert_non_null(zh);
    uint64_t end = mono_ms() + WAIT_MS;
    while (zoo_state(zh) != ZOO_CONNECTED_STATE && mono_ms() < end)
        sleep_ms(20);
    assert_int_equal(zoo_state(zh), ZOO_CONNECTED_STATE);
    return zh;
}

/* Retries through a reconnect of the test's own session (after a server
 * stop or restart). */
static int reg_call(zhandle_t *zh, int op, const char *path, const char *data, int flags)
{
    uint64_t end = mono_ms() + WAIT_MS;
    int rc;
    for (;;) {
        if (op == 'c')
            rc = zoo_create(zh, path, data, data ? (int)strlen(data) : -1, &ZOO_OPEN_ACL_UNSAFE,
                            flags, NULL, 0);
        else if (op == 'd')
            rc = zoo_delete(zh, path, -1);
        else
            rc = zoo_set(zh, path, data, (int)strlen(data), -1);
        if ((rc != ZCONNECTIONLOSS && rc != ZOPERATIONTIMEOUT) || mono_ms() > end)
            return rc;
        sleep_ms(100);
    }
}

/* Persistent parents, like ThingWorx's Curator creates them. */
static void reg_mkdirs(zhandle_t *zh, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            int rc = reg_call(zh, 'c', buf, NULL, 0);
            assert_true(rc == ZOK || rc == ZNODEEXISTS);
            *p = c;
            if (!c)
                break;
        }
    }
}

static void record(char *buf, size_t size, const char *id, int port, int ssl_port)
{
    snprintf(buf, size,
             "{\"name\":\"thingworx-https\",\"id\":\"%s\",\"address\":\"127.0.0.1\","
             "\"port\":%d,\"sslPort\":%d,\"payload\":null,\"registrationTimeUTC\":1700000000000,"
             "\"serviceType\":\"DYNAMIC\",\"uriSpec\":null}",
             id, port, ssl_port);
}

/* One platform: an ephemeral child <parent>/<node>. */
static void reg_add(zhandle_t *zh, const char *parent, const char *node, const char *data)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", parent, node);
    int rc = reg_call(zh, 'c', path, data, ZOO_EPHEMERAL);
    if (rc != ZOK)
        fail_msg("create %s: %s", path, zerror(rc));
}

static void reg_platform(zhandle_t *zh, const char *parent, const char *id, int ssl_port)
{
    char data[512];
    record(data, sizeof(data), id, 8080, ssl_port);
    reg_add(zh, parent, id, data);
}

static void reg_del(zhandle_t *zh, const char *parent, const char *node)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", parent, node);
    assert_int_equal(reg_call(zh, 'd', path, NULL, 0), ZOK);
}

/* ---- the host table ---- */

struct post {
    struct post *next;
    void (*fn)(void *);
    void *arg;
};

struct fx {
    struct th_host th;
    uv_async_t async;
    pthread_mutex_t mu;
    struct post *head, **tail;
    bool closed;
    int posts_after_stop;

    zhandle_t *reg;
    char parent[128];
};

static struct fx *fx_of(const struct emx_host *h)
{
    return ((struct th_host *)h->core)->user;
}

/* Like the core's: a locked list and a uv_async. Any thread. */
static int host_post(const struct emx_host *h, void (*fn)(void *), void *arg)
{
    struct fx *fx = fx_of(h);
    struct post *p = malloc(sizeof(*p));
    if (!p)
        return -ENOMEM;
    *p = (struct post){NULL, fn, arg};
    pthread_mutex_lock(&fx->mu);
    if (fx->closed) {
        pthread_mutex_unlock(&fx->mu);
        free(p);
        return -ESHUTDOWN;
    }
    if (fx->th.rec.stopped)
        fx->posts_after_stop++;
    *fx->tail = p;
    fx->tail = &p->next;
    pthread_mutex_unlock(&fx->mu);
    uv_async_send(&fx->async);
    return 0;
}

static void drain_posts(struct fx *fx)
{
    pthread_mutex_lock(&fx->mu);
    struct post *list = fx->head;
    fx->head = NULL;
    fx->tail = &fx->head;
    pthread_mutex_unlock(&fx->mu);
    while (list) {
        struct post *p = list;
        list = p->next;
        p->fn(p->arg);
        free(p);
    }
}

static void on_async(uv_async_t *a)
{
    drain_posts(a->data);
}

static int host_parse(const char *text, uint64_t *out)
{
    (void)text;
    (void)out;
    return -EINVAL; /* the plugin parses nothing itself */
}

/* ---- the loop ---- */

static bool log_pred(struct th_host *th, long needle)
{
    return th_log_has(th, (const char *)needle);
}

/* Warn-level lines holding needle (lines are recorded as "<level> text"). */
static int th_warn_count(const struct th_host *th, const char *needle)
{
    int n = 0;
    for (int i = 0; i < th->rec.nlogs; i++) {
        const char *l = th_log(th, i);
        n += l[0] == '0' + EMX_LOG_WARN && l[1] == ' ' && strstr(l, needle) != NULL;
    }
    return n;
}

static bool warn_pred(struct th_host *th, long needle)
{
    return th_warn_count(th, (const char *)needle) > 0;
}

#define warn_count(fx, needle) th_warn_count(&(fx)->th, (needle))

/* The set is that one instance alone. */
static bool th_find_only(struct th_host *th, long id)
{
    return th->rec.count == 1 && th_find(th, (const char *)id) != NULL;
}

#define WAIT(fx, pred, arg, ms)                                                                    \
    do {                                                                                           \
        if (!th_wait_until(&(fx)->th, (pred), (long)(arg), (ms))) {                                \
            th_dump_logs(&(fx)->th);                                                               \
            fail_msg("timed out after %d ms waiting for %s(%s)", (int)(ms), #pred, #arg);          \
        }                                                                                          \
    } while (0)

/* ---- the plugin ---- */

static void set_ms(struct fx *fx, const char *name, uint64_t value)
{
    th_set(&fx->th, name, TH_TYPE(EMX_OPT_DURATION), &value, sizeof(value));
}

/* Binds the defaults the way the core would; options without one unset. */
static void set_defaults(struct fx *fx)
{
    memset(fx->th.cfg, 0, fx->th.d->config_size);
    for (const struct emx_option *o = fx->th.d->options; o->name; o++) {
        if (!o->def)
            continue;
        if (o->type == EMX_OPT_STRING) {
            th_set_str(&fx->th, o->name, o->def);
        } else if (o->type == EMX_OPT_DURATION) {
            char *end;
            unsigned long long v = strtoull(o->def, &end, 10);
            assert_string_equal(end, "s");
            set_ms(fx, o->name, v * 1000);
        } else {
            fail_msg("unexpected default type for %s", o->name);
        }
    }
}

static int test_counter;

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    const struct th_config conf = {
        .plugin = EMX_ZK_PLUGIN,
        .name = "zookeeper",
        .set_max = SET_MAX,
        .log_max = LOG_MAX,
        .log_len = 640,
        .line_len = 600,
        .debug_disabled = true,
        .parse_size = host_parse,
        .parse_duration = host_parse,
    };
    th_open(&fx->th, &conf, fx);
    fx->th.host.post = host_post;
    assert_int_equal(uv_async_init(&fx->th.loop, &fx->async, on_async), 0);
    fx->async.data = fx;
    pthread_mutex_init(&fx->mu, NULL);
    fx->tail = &fx->head;

    set_defaults(fx);
    th_set_str(&fx->th, "connection_string", srv.hostport);
    /* Each test has its own base path, so tests never see each other. */
    snprintf(fx->parent, sizeof(fx->parent), "/t%d/thingworx-https", ++test_counter);
    static char base[64];
    snprintf(base, sizeof(base), "/t%d", test_counter);
    th_set_str(&fx->th, "base_path", base);
    *state = fx;
    return 0;
}

/* stop, let the plugin's handle close on the pool, destroy: the loop must
 * then close, and nothing may reach the host after stop. */
static void finish(struct fx *fx)
{
    if (fx->th.inst) {
        th_stop(&fx->th, false);
        /* Events posted before stop still run (the core runs them too). */
        drain_posts(fx);
        pthread_mutex_lock(&fx->mu);
        fx->closed = true;
        pthread_mutex_unlock(&fx->mu);
        uv_close((uv_handle_t *)&fx->async, NULL);
        fx->th.d->destroy(fx->th.inst);
        fx->th.inst = NULL;
    } else if (!uv_is_closing((uv_handle_t *)&fx->async)) {
        uv_close((uv_handle_t *)&fx->async, NULL);
    }
    th_await_idle(&fx->th, WAIT_MS);
    assert_int_equal(fx->posts_after_stop, 0);
    th_close_loop(&fx->th);
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    if (!fx->th.rec.stopped)
        finish(fx);
    relay_stop();
    for (int i = 0; i < fx->th.rec.nlogs; i++)
        assert_null(strstr(th_log(&fx->th, i), SECRET));
    if (fx->reg)
        zookeeper_close(fx->reg);
    th_close(&fx->th);
    pthread_mutex_destroy(&fx->mu);
    free(fx);
    return 0;
}

static void registered(struct fx *fx)
{
    fx->reg = reg_open();
    reg_mkdirs(fx->reg, fx->parent);
}

/* ---- tests ---- */

static void test_initial_set(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    char data[512];
    snprintf(data, sizeof(data),
             "{\"id\":\"p2\",\"address\":\"::1\",\"port\":8080,\"sslPort\":8444,"
             "\"payload\":{\"zone\":\"b\",\"weight\":3,\"priority\":1}}");
    reg_add(fx->reg, fx->parent, "node-of-p2", data);
    th_set_str(&fx->th, "digest", "edgemux:" SECRET);
    th_start(&fx->th);
    WAIT(fx, th_updates_over, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    const struct th_instance *p1 = th_find(&fx->th, "p1"), *p2 = th_find(&fx->th, "p2");
    assert_non_null(p1);
    assert_non_null(p2);
    assert_string_equal(p1->host, "127.0.0.1");
    assert_int_equal(p1->port, 8443);
    assert_true(p1->tls);
    assert_int_equal(p1->weight, 1);
    assert_int_equal(p1->priority, 0);
    assert_null(p1->metadata);
    assert_string_equal(p2->host, "::1");
    assert_int_equal(p2->port, 8444);
    assert_int_equal(p2->weight, 3);
    assert_int_equal(p2->priority, 1);
    assert_string_equal(p2->metadata, "{\"zone\":\"b\",\"weight\":3,\"priority\":1}");
    assert_true(th_log_has(&fx->th, "added p1, p2"));
    assert_int_equal(fx->th.rec.failures, 0);
    /* Nothing changes: nothing is reported. */
    th_run_for(&fx->th, 300);
    assert_int_equal(fx->th.rec.updates, 1);
}

static void test_add_and_remove_promptly(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 1, WAIT_MS);

    uint64_t t0 = mono_ms();
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    WAIT(fx, th_count_is, 2, PROMPT_MS);
    assert_non_null(th_find(&fx->th, "p2"));
    uint64_t added_ms = mono_ms() - t0;

    t0 = mono_ms();
    reg_del(fx->reg, fx->parent, "p1");
    WAIT(fx, th_count_is, 1, PROMPT_MS);
    assert_non_null(th_find(&fx->th, "p2"));
    assert_true(th_log_has(&fx->th, "removed p1"));
    fprintf(stderr, "  added seen after %llu ms, removed after %llu ms\n",
            (unsigned long long)added_ms, (unsigned long long)(mono_ms() - t0));

    /* A platform re-registering with new data (Curator's updateService). */
    char data[512];
    record(data, sizeof(data), "p2", 8080, 9443);
    char path[256];
    snprintf(path, sizeof(path), "%s/p2", fx->parent);
    int before = fx->th.rec.updates;
    assert_int_equal(reg_call(fx->reg, 's', path, data, 0), ZOK);
    WAIT(fx, th_updates_over, before, PROMPT_MS);
    assert_int_equal(th_find(&fx->th, "p2")->port, 9443);
    assert_true(th_log_has(&fx->th, "changed p2"));
    assert_int_equal(fx->th.rec.empty_updates, 0);
    assert_int_equal(fx->th.rec.failures, 0);
}

static void test_registering_session_closed(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    zhandle_t *other = reg_open();
    reg_platform(other, fx->parent, "p9", 8449);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 2, WAIT_MS);
    /* The platform dies: its session ends, its ephemeral node goes. */
    zookeeper_close(other);
    WAIT(fx, th_count_is, 1, PROMPT_MS);
    assert_non_null(th_find(&fx->th, "p1"));
    assert_int_equal(fx->th.rec.failures, 0);
}

static void test_bad_records_skipped(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    reg_add(fx->reg, fx->parent, "badjson", "{\"address\": \"10.0.0.1\", ");
    reg_add(fx->reg, fx->parent, "noport", "{\"id\":\"x\",\"address\":\"10.0.0.2\",\"port\":80}");
    th_start(&fx->th);
    WAIT(fx, th_updates_over, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "p1"));
    assert_true(th_log_has(&fx->th, "node 'badjson': not valid JSON"));
    assert_true(th_log_has(&fx->th, "node 'noport': no sslPort"));
    assert_int_equal(fx->th.rec.failures, 0);

    /* Another round finds the same bad nodes: no new warning about them. */
    int before = fx->th.rec.updates;
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    WAIT(fx, th_updates_over, before, PROMPT_MS);
    assert_int_equal(warn_count(fx, "node 'badjson': not valid JSON"), 1);
    assert_int_equal(warn_count(fx, "node 'noport': no sslPort"), 1);
    /* A node broken another way is warned about again. */
    char path[256];
    snprintf(path, sizeof(path), "%s/badjson", fx->parent);
    assert_int_equal(reg_call(fx->reg, 's', path, "[1]", 0), ZOK);
    WAIT(fx, warn_pred, "node 'badjson': expected a JSON object", PROMPT_MS);
    assert_int_equal(warn_count(fx, "node 'noport': no sslPort"), 1);
    reg_del(fx->reg, fx->parent, "p2");
    WAIT(fx, th_count_is, 1, PROMPT_MS);

    /* Every record bad: a failing source, the last good set kept. */
    int updates = fx->th.rec.updates;
    reg_del(fx->reg, fx->parent, "p1");
    WAIT(fx, th_failures_over, 0, PROMPT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "every instance record is invalid"));
    assert_int_equal(fx->th.rec.updates, updates);
    assert_int_equal(fx->th.rec.count, 1);

    /* A good one again: reported. */
    reg_platform(fx->reg, fx->parent, "p3", 8443);
    WAIT(fx, th_updates_over, updates, PROMPT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "p3"));
    assert_int_equal(fx->th.rec.empty_updates, 0);
}

static void test_service_node_missing(void **state)
{
    struct fx *fx = *state;
    fx->reg = reg_open();
    th_start(&fx->th);
    /* No platform registered yet: an empty answer, not a failure. */
    WAIT(fx, th_updates_over, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    assert_true(th_log_has(&fx->th, "does not exist"));

    reg_mkdirs(fx->reg, fx->parent);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    WAIT(fx, th_count_is, 1, PROMPT_MS);
    assert_int_equal(fx->th.rec.failures, 0);
}

static void test_http_service(void **state)
{
    struct fx *fx = *state;
    snprintf(fx->parent, sizeof(fx->parent), "/t%d/thingworx-http", test_counter);
    registered(fx);
    reg_add(fx->reg, fx->parent, "h1",
            "{\"name\":\"thingworx-http\",\"id\":\"h1\",\"address\":\"127.0.0.1\",\"port\":8080,"
            "\"sslPort\":null,\"payload\":null,\"serviceType\":\"DYNAMIC\"}");
    th_set_str(&fx->th, "service", "thingworx-http");
    th_start(&fx->th);
    WAIT(fx, th_count_is, 1, WAIT_MS);
    assert_int_equal(fx->th.rec.set[0].port, 8080);
    assert_false(fx->th.rec.set[0].tls);
}

static void test_create_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    struct {
        const char *name, *value;
    } bad[] = {
        {"connection_string", ""}, {"base_path", "services"}, {"service", "a/b"},
        {"service", ""},           {"tls", "maybe"},          {"digest", "no-colon-" SECRET},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        set_defaults(fx);
        th_set_str(&fx->th, "connection_string", srv.hostport);
        th_set_str(&fx->th, bad[i].name, bad[i].value);
        assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    }
    set_defaults(fx);
    th_set_str(&fx->th, "connection_string", NULL);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    set_defaults(fx);
    th_set_str(&fx->th, "connection_string", srv.hostport);
    set_ms(fx, "session_timeout", 10);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), -EINVAL);
    /* And one that is fine, destroyed without a start. */
    set_defaults(fx);
    th_set_str(&fx->th, "connection_string", srv.hostport);
    th_set_str(&fx->th, "base_path", "/services/");
    th_set_str(&fx->th, "tls", "false");
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), 0);
    fx->th.d->destroy(inst);
}

static void test_unreachable_at_start(void **state)
{
    struct fx *fx = *state;
    char cs[64];
    snprintf(cs, sizeof(cs), "127.0.0.1:%d", free_port());
    th_set_str(&fx->th, "connection_string", cs);
    set_ms(fx, "session_timeout", 1000);
    th_start(&fx->th);
    WAIT(fx, th_failures_over, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "no ZooKeeper session"));
    assert_int_equal(fx->th.rec.updates, 0);
}

/* Freezing the server longer than the plugin's session timeout: the
 * connection is lost (a failure) and the set is kept; when the server runs
 * again the plugin resumes its session or, if the server expired it first
 * (a race inside the server), opens a new one; either way the set is right
 * again, with no empty set in between. */
static void test_server_frozen(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    set_ms(fx, "session_timeout", 2000);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 2, WAIT_MS);
    int updates = fx->th.rec.updates;

    assert_int_equal(kill(srv.pid, SIGSTOP), 0);
    uint64_t t0 = mono_ms();
    bool lost = th_wait_until(&fx->th, th_failures_over, 0, 5000);
    /* Past the session timeout with margin, so the server expires it. */
    long left = 4500 - (long)(mono_ms() - t0);
    if (left > 0)
        th_run_for(&fx->th, (uint64_t)left);
    assert_int_equal(kill(srv.pid, SIGCONT), 0);
    if (!lost) {
        th_dump_logs(&fx->th);
        fail_msg("no failure reported while the server was stopped");
    }
    /* First the loss; past the session timeout it is taken as expired. */
    assert_true(th_log_has(&fx->th, "connection to ZooKeeper lost"));
    assert_int_equal(fx->th.rec.updates, updates);
    assert_int_equal(fx->th.rec.count, 2);

    /* A platform registers while the plugin is away. */
    reg_platform(fx->reg, fx->parent, "p3", 8445);
    WAIT(fx, th_count_is, 3, WAIT_MS);
    assert_non_null(th_find(&fx->th, "p3"));
    assert_int_equal(fx->th.rec.empty_updates, 0);
    fprintf(stderr, "  session %s\n",
            th_log_has(&fx->th, "opening a new ZooKeeper session") ? "expired and renewed"
                                                                   : "resumed");

    /* And the (new) session watches again. */
    reg_del(fx->reg, fx->parent, "p1");
    WAIT(fx, th_count_is, 2, PROMPT_MS);
}

/* The plugin cut off (through the relay) longer than its session timeout:
 * a failure, the set kept, the server expires the session, the plugin sees
 * that when it gets through again, reports it, opens a new session and
 * reports the set as it is now. */
static void test_session_expiry(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    relay_start();
    char cs[64];
    snprintf(cs, sizeof(cs), "127.0.0.1:%d", relay.port);
    th_set_str(&fx->th, "connection_string", cs);
    set_ms(fx, "session_timeout", 2000);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 2, WAIT_MS);
    int updates = fx->th.rec.updates;

    relay.cut = 1;
    WAIT(fx, th_failures_over, 0, 5000);
    assert_non_null(strstr(fx->th.rec.reason, "connection to ZooKeeper lost"));
    /* Changes while it is away; then well past the timeout. */
    reg_platform(fx->reg, fx->parent, "p3", 8445);
    reg_del(fx->reg, fx->parent, "p1");
    th_run_for(&fx->th, 4000);
    assert_int_equal(fx->th.rec.updates, updates);
    assert_int_equal(fx->th.rec.count, 2);
    assert_non_null(th_find(&fx->th, "p1"));

    /* Not back within the session timeout: taken as expired, a new session
     * opened (it connects once the relay lets it). */
    assert_true(th_log_has(&fx->th, "taken as expired"));
    relay.cut = 0;
    WAIT(fx, log_pred, "opening a new ZooKeeper session", WAIT_MS);
    WAIT(fx, th_updates_over, updates, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    assert_non_null(th_find(&fx->th, "p2"));
    assert_non_null(th_find(&fx->th, "p3"));
    assert_true(fx->th.rec.failures >= 2);
    assert_int_equal(fx->th.rec.empty_updates, 0);

    /* The new session watches again. */
    reg_del(fx->reg, fx->parent, "p2");
    WAIT(fx, th_count_is, 1, PROMPT_MS);
    finish(fx);
    relay_stop();
}

/* The server goes away: one failure, the set kept, nothing else reported
 * while it is down; it comes back and the set is reported again. */
static void test_server_down(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    set_ms(fx, "session_timeout", 4000);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 2, WAIT_MS);
    int updates = fx->th.rec.updates;

    server_stop();
    WAIT(fx, th_failures_over, 0, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "connection to ZooKeeper lost"));
    th_run_for(&fx->th, 2500);
    assert_int_equal(fx->th.rec.updates, updates);
    assert_int_equal(fx->th.rec.count, 2);
    assert_int_equal(fx->th.rec.empty_updates, 0);

    assert_int_equal(server_start(), 0);
    WAIT(fx, th_updates_over, updates, 45000); /* a JVM restart on a loaded machine */
    assert_int_equal(fx->th.rec.count, 2);
    assert_non_null(th_find(&fx->th, "p1"));
    assert_int_equal(fx->th.rec.empty_updates, 0);
}

/* The ensemble comes back with older state (rebuilt, or restored from an
 * older snapshot): it refuses the plugin's session for good ("server
 * refused to accept the client") and libzookeeper stays "connecting" without
 * ever reporting expiry. Past the session timeout the plugin takes the
 * session as expired, opens a new one and reports the set as it is now. */
static void test_server_back_with_older_state(void **state)
{
    struct fx *fx = *state;
    registered(fx);
    reg_platform(fx->reg, fx->parent, "p1", 8443);
    reg_platform(fx->reg, fx->parent, "p2", 8444);
    set_ms(fx, "session_timeout", 2000);
    th_start(&fx->th);
    WAIT(fx, th_count_is, 2, WAIT_MS);

    /* A new, empty database on the same address. */
    server_stop();
    char data[sizeof(srv.dir) + 8];
    snprintf(data, sizeof(data), "%s/data", srv.dir);
    nftw(data, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    WAIT(fx, th_failures_over, 0, WAIT_MS);
    assert_int_equal(server_start(), 0);
    /* The registrar's session is refused the same way: a new one. */
    zookeeper_close(fx->reg);
    fx->reg = reg_open();
    reg_mkdirs(fx->reg, fx->parent);
    reg_platform(fx->reg, fx->parent, "p3", 8445);

    WAIT(fx, log_pred, "taken as expired", 45000); /* a JVM restart on a loaded machine */
    assert_true(th_log_has(&fx->th, "opening a new ZooKeeper session"));
    WAIT(fx, th_find_only, "p3", WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    assert_non_null(th_find(&fx->th, "p3"));

    /* The new session watches again. */
    reg_platform(fx->reg, fx->parent, "p4", 8446);
    WAIT(fx, th_count_is, 2, PROMPT_MS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_initial_set, setup, teardown),
        cmocka_unit_test_setup_teardown(test_add_and_remove_promptly, setup, teardown),
        cmocka_unit_test_setup_teardown(test_registering_session_closed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_records_skipped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_service_node_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_http_service, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreachable_at_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_frozen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_down, setup, teardown),
        /* Last: it leaves the server with a new database. */
        cmocka_unit_test_setup_teardown(test_server_back_with_older_state, setup, teardown),
    };
    if (getenv("EMX_TEST_FILTER"))
        cmocka_set_test_filter(getenv("EMX_TEST_FILTER"));
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
