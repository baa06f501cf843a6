/* The test tools against each other, without edgemux (the benchmark's
 * baseline path): platform-sim started on free ports, driven by libedgeclient
 * and by its control channel.
 *
 * usage: test_tools_e2e <platform-sim binary>
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "ao.h"
#include "edgeclient.h"
#include "ws.h"

#define KEY "d0a1b2c3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"

extern char **environ;

static int failures;
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)
#define REQUIRE(cond, ...)                                                                         \
    do {                                                                                           \
        bool ok_ = (cond);                                                                         \
        CHECK(ok_, __VA_ARGS__);                                                                   \
        if (!ok_)                                                                                  \
            finish_and_exit();                                                                     \
    } while (0)

static uv_loop_t loop;
static pid_t sim_pid;
static int ctl_fd = -1;
static unsigned ports[4];
static uint32_t next_answer_size; /* answer_size of the next client made */

static void finish_and_exit(void)
{
    if (sim_pid > 0) {
        kill(sim_pid, SIGTERM);
        waitpid(sim_pid, NULL, 0);
    }
    fprintf(stderr, "%d failure(s)\n", failures);
    exit(1);
}

typedef bool (*cond_fn)(void *arg);

/* Run the loop until cond holds or timeout_ms passes. */
static bool run_until(cond_fn cond, void *arg, unsigned timeout_ms)
{
    uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
    while (!cond(arg)) {
        if (uv_hrtime() > end)
            return false;
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    return true;
}

static bool is_ready(void *arg)
{
    return emx_edge_client_state(arg) == EDGE_READY;
}

static bool is_down(void *arg)
{
    enum edge_state s = emx_edge_client_state(arg);
    return s == EDGE_DOWN || s == EDGE_STOPPED;
}

static bool none_pending(void *arg)
{
    return emx_edge_client_pending(arg) == 0;
}

struct wait_conn {
    struct emx_edge_client *c;
    uint64_t disconnects;
};
static bool disconnected(void *arg)
{
    struct wait_conn *w = arg;
    return emx_edge_client_stats(w->c)->disconnects > w->disconnects;
}

/* Send a control line and wait for one reply line, running the loop so
 * our edges can answer platform requests meanwhile. */
static char *ctl(const char *cmd, unsigned timeout_ms)
{
    static char line[1 << 16];
    size_t n = strlen(cmd);
    if (write(ctl_fd, cmd, n) != (ssize_t)n || write(ctl_fd, "\n", 1) != 1)
        return NULL;
    size_t got = 0;
    uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
    while (uv_hrtime() < end) {
        ssize_t r = recv(ctl_fd, line + got, sizeof(line) - 1 - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            line[got] = '\0';
            char *nl = strchr(line, '\n');
            if (nl) {
                *nl = '\0';
                return line;
            }
            if (got == sizeof(line) - 1)
                return NULL;
        } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            return NULL;
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    return NULL;
}

static void start_sim(const char *bin)
{
    int out[2];
    if (pipe(out) != 0)
        exit(1);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    char *argv[] = {(char *)bin, "--instances", "2",         "--port", "0",
                    "--control", "0",           "--app-key", KEY,      "--deflate",
                    "--bind",    "127.0.0.1",   "--quiet",   NULL};
    if (posix_spawn(&sim_pid, bin, &fa, NULL, argv, environ) != 0) {
        fprintf(stderr, "cannot start %s\n", bin);
        exit(1);
    }
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    char buf[512];
    size_t got = 0;
    while (got < sizeof(buf) - 1 && !memchr(buf, '\n', got)) {
        ssize_t r = read(out[0], buf + got, sizeof(buf) - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(out[0]);
    buf[got] = '\0';
    unsigned cport = 0;
    REQUIRE(
        sscanf(buf, "platform-sim ready control=%u ports=%u,%u", &cport, &ports[1], &ports[2]) == 3,
        "ready line: %s", buf);
    ctl_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cport)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    REQUIRE(connect(ctl_fd, (struct sockaddr *)&sa, sizeof(sa)) == 0, "control connect");
}

static struct emx_edge_client *new_client(unsigned inst, uint32_t max_frame, bool deflate,
                                          const char *key, const char *extra)
{
    char url[128];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%u/Thingworx/WS", ports[inst]);
    struct edge_client_config cfg = {.url = url,
                                     .app_key = key,
                                     .max_frame_size = max_frame,
                                     .deflate = deflate,
                                     .max_connect_delay_ms = 1,
                                     .connect_retry_interval_ms = 100,
                                     .connect_timeout_ms = 3000,
                                     .extra_headers = extra,
                                     .answer_size = next_answer_size,
                                     .no_reconnect = extra != NULL || key != NULL};
    if (!key)
        cfg.app_key = KEY;
    struct emx_edge_client *c = emx_edge_client_new(&loop, &cfg);
    REQUIRE(c != NULL, "client new");
    REQUIRE(emx_edge_client_start(c) == 0, "client start");
    return c;
}

static const struct edge_ledger_entry *last_entry(struct emx_edge_client *c)
{
    const struct edge_ledger *l = emx_edge_client_ledger(c);
    return l->count ? &l->entries[l->count - 1] : NULL;
}

/* Request with an InfoTable of `size` bytes; wait for its outcome. */
static const struct edge_ledger_entry *roundtrip(struct emx_edge_client *c, uint8_t type,
                                                 const char *name, size_t size)
{
    uint8_t *it = NULL, *fill = NULL;
    size_t itl = 0;
    if (size) {
        size_t cap = ao_infotable_blob_size(name, size);
        fill = malloc(size);
        it = malloc(cap);
        REQUIRE(fill && it, "malloc");
        for (size_t i = 0; i < size; i++)
            fill[i] = (uint8_t)(i * 7 + 3);
        itl = ao_infotable_blob(it, cap, name, fill, size);
    }
    uint32_t rid = emx_edge_client_request(c, type, "SteamSensor", EDGE_CHAR_PROPERTIES, name, it,
                                           itl, NULL, NULL);
    free(it);
    free(fill);
    CHECK(rid != 0, "request refused");
    if (!rid)
        return NULL;
    CHECK(run_until(none_pending, c, 10000), "no answer to request %u", rid);
    return &emx_edge_client_ledger(c)->entries[rid - 1];
}

static void check_ledger(struct emx_edge_client *c, const char *who, uint64_t want_lost,
                         uint64_t want_bad)
{
    emx_edge_client_close_ledger(c);
    const struct edge_ledger *l = emx_edge_client_ledger(c);
    uint64_t sum = 0;
    for (int o = 0; o < EDGE_OUTCOME_COUNT; o++)
        sum += l->by_outcome[o];
    CHECK(sum == l->count, "%s: outcome counts %llu != entries %zu", who, (unsigned long long)sum,
          l->count);
    CHECK(l->by_outcome[EDGE_PENDING] == 0, "%s: pending after close", who);
    CHECK(l->by_outcome[EDGE_NO_ANSWER] == 0, "%s: %llu no_answer", who,
          (unsigned long long)l->by_outcome[EDGE_NO_ANSWER]);
    CHECK(l->by_outcome[EDGE_CONNECTION_LOST] == want_lost, "%s: connection_lost %llu, want %llu",
          who, (unsigned long long)l->by_outcome[EDGE_CONNECTION_LOST],
          (unsigned long long)want_lost);
    for (size_t i = 0; i < l->count; i++) {
        CHECK(l->entries[i].request_id == i + 1, "%s: requestIds count from 1", who);
        CHECK(l->entries[i].outcome != EDGE_PENDING, "%s: entry %zu pending", who, i);
    }
    const struct edge_client_stats *s = emx_edge_client_stats(c);
    CHECK(s->unexpected_answers == 0 && s->bad_messages == want_bad && s->wrong_endpoint == 0,
          "%s: server misbehaved: unexpected %llu bad %llu wrong_ep %llu", who,
          (unsigned long long)s->unexpected_answers, (unsigned long long)s->bad_messages,
          (unsigned long long)s->wrong_endpoint);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s <platform-sim>\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    start_sim(argv[1]);

    /* AUTH, BIND, GET. */
    struct emx_edge_client *a = new_client(1, 8192, false, NULL, NULL);
    REQUIRE(run_until(is_ready, a, 5000), "edge A not ready: %s",
            emx_edge_client_stats(a)->last_reason ? emx_edge_client_stats(a)->last_reason : "-");
    CHECK(emx_edge_client_session(a) != 0xFFFFFFFFu, "no sessionId from AUTH");
    const char *things[] = {"SteamSensor"};
    emx_edge_client_bind(a, things, 1);
    CHECK(run_until(none_pending, a, 5000), "BIND unanswered");
    const struct edge_ledger_entry *e = last_entry(a);
    CHECK(e && e->type == 0x0A && e->outcome == EDGE_ANSWERED && e->code == 0x40, "BIND answer");
    e = roundtrip(a, 0x01, "Temperature", 0);
    CHECK(e && e->outcome == EDGE_ANSWERED && e->code == 0x40, "GET answer");

    /* A 1 MiB multipart request, answered (the echo comes back multipart). */
    e = roundtrip(a, 0x02, "Blob", 1 << 20);
    CHECK(e && e->multipart && e->outcome == EDGE_ANSWERED && e->code == 0x40,
          "1 MiB multipart PUT answer");
    CHECK(emx_edge_client_stats(a)->max_frame_in <= 8192, "frame over 8192");

    /* Platform → edge GET through the control channel. */
    char *r = ctl("binds", 3000);
    CHECK(r && strstr(r, "\"SteamSensor\""), "binds: %s", r ? r : "(none)");
    r = ctl("get 1 SteamSensor Temperature", 5000);
    CHECK(r && strcmp(r, "answer 0x40 SUCCESS") == 0, "platform GET: %s", r ? r : "(none)");
    r = ctl("put 1 SteamSensor Temperature 42", 5000);
    CHECK(r && strcmp(r, "answer 0x40 SUCCESS") == 0, "platform PUT: %s", r ? r : "(none)");
    r = ctl("get 1 NoSuchThing Temperature", 5000);
    CHECK(r && strncmp(r, "err", 3) == 0, "GET of an unbound Thing: %s", r ? r : "(none)");

    /* Max-Frame-Size 4096: every frame received stays within it. */
    struct emx_edge_client *b = new_client(2, 4096, false, NULL, NULL);
    REQUIRE(run_until(is_ready, b, 5000), "edge B not ready");
    e = roundtrip(b, 0x02, "Blob", 100000);
    CHECK(e && e->outcome == EDGE_ANSWERED && e->code == 0x40, "B multipart answer");
    const struct edge_client_stats *bs = emx_edge_client_stats(b);
    CHECK(bs->max_frame_in > 0 && bs->max_frame_in <= 4096, "B max frame %u", bs->max_frame_in);

    /* permessage-deflate, context takeover both ways. */
    struct emx_edge_client *d = new_client(1, 8192, true, NULL, NULL);
    REQUIRE(run_until(is_ready, d, 5000), "edge D not ready");
    CHECK(emx_edge_client_stats(d)->deflate_active, "deflate not negotiated");
    for (int i = 0; i < 3; i++) {
        e = roundtrip(d, 0x02, "Blob", 50000 + (size_t)i * 1000);
        CHECK(e && e->outcome == EDGE_ANSWERED && e->code == 0x40, "deflate answer %d", i);
    }
    CHECK(emx_edge_client_stats(d)->max_frame_in <= 8192, "deflate frame over 8192");

    /* A pipe without the X-Edgemux-Boot header is refused with 400. */
    struct emx_edge_client *p = new_client(1, 8192, false, KEY, "X-Edgemux-Server: t1\r\n");
    struct wait_conn wp = {p, 0};
    CHECK(run_until(disconnected, &wp, 5000), "pipe without headers not refused");
    CHECK(emx_edge_client_stats(p)->last_http_status == 400, "status %u",
          emx_edge_client_stats(p)->last_http_status);
    /* A proper pipe upgrade and AUTH is connected. */
    struct emx_edge_client *p2 = new_client(
        1, 8192, false, KEY, "X-Edgemux-Server: t1\r\nX-Edgemux-Boot: 0123456789abcdef\r\n");
    CHECK(run_until(is_ready, p2, 5000), "pipe not connected");
    r = ctl("stats", 3000);
    CHECK(r && strstr(r, "\"pipes_connected\":1"), "stats: %s", r ? r : "(none)");
    CHECK(r && strstr(r, "\"missing_pipe_headers\":1"), "violation not counted: %s",
          r ? r : "(none)");
    /* A wrong app key in AUTH: 0x81, then closed. */
    struct emx_edge_client *w = new_client(1, 8192, false, "wrong-key", NULL);
    struct wait_conn ww = {w, 0};
    CHECK(run_until(disconnected, &ww, 5000), "bad AUTH not closed");
    e = last_entry(w);
    CHECK(e && e->type == 0x14 && e->code == 0x81, "bad AUTH answer");

    /* Crash instance 1 with a request in flight (reads stopped so it is not
     * answered): the request is connection_lost; after restore A comes back
     * on its own, re-binds, and platform requests reach it again. */
    CHECK((r = ctl("stop-reading 1", 3000)) && strcmp(r, "ok") == 0, "stop-reading");
    uint32_t rid =
        emx_edge_client_request(a, 0x01, "SteamSensor", 1, "Temperature", NULL, 0, NULL, NULL);
    CHECK(rid != 0, "request before crash");
    struct wait_conn wa = {a, emx_edge_client_stats(a)->disconnects};
    CHECK((r = ctl("crash 1", 3000)) && strcmp(r, "ok") == 0, "crash");
    CHECK(run_until(disconnected, &wa, 5000), "A not dropped by crash");
    CHECK(run_until(is_down, a, 1000), "A not down");
    CHECK(emx_edge_client_ledger(a)->entries[rid - 1].outcome == EDGE_CONNECTION_LOST,
          "in-flight request not connection_lost");
    CHECK((r = ctl("resume-reading 1", 3000)) && strcmp(r, "ok") == 0, "resume-reading");
    CHECK((r = ctl("restore 1", 3000)) && strcmp(r, "ok") == 0, "restore: %s", r ? r : "-");
    CHECK(run_until(is_ready, a, 5000), "A did not reconnect");
    CHECK(run_until(none_pending, a, 5000), "re-BIND unanswered");
    r = ctl("get 1 SteamSensor Temperature", 5000);
    CHECK(r && strcmp(r, "answer 0x40 SUCCESS") == 0, "platform GET after restore: %s",
          r ? r : "(none)");
    e = roundtrip(a, 0x01, "Temperature", 0);
    CHECK(e && e->outcome == EDGE_ANSWERED && e->code == 0x40, "GET after restore");

    /* Strict receive checks: a server ping is ignored (the SDK never
     * answers one); an oversized frame, a 64-bit length, a text message or
     * an unparseable header drops the connection, with the reason kept. */
    struct emx_edge_client *v = new_client(2, 8192, false, NULL, NULL);
    const char *victim[] = {"Victim"};
    emx_edge_client_bind(v, victim, 1);
    REQUIRE(run_until(is_ready, v, 5000), "edge V not ready");
    CHECK(run_until(none_pending, v, 5000), "V BIND unanswered");
    r = ctl("misbehave Victim ping", 3000);
    CHECK(r && strcmp(r, "ok") == 0, "misbehave ping: %s", r ? r : "-");
    e = roundtrip(v, 0x01, "Temperature", 0); /* the ping arrived before this answer */
    CHECK(emx_edge_client_stats(v)->pings_ignored == 1, "server ping not ignored");
    CHECK(emx_edge_client_state(v) == EDGE_READY, "dropped for a ping");
    static const struct {
        const char *kind, *reason;
    } bad[] = {{"oversize", "frame larger than Max-Frame-Size"},
               {"len64", "frame with a 64-bit length"},
               {"text", "text message"},
               {"badheader", "bad AlwaysOn header"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct wait_conn wv = {v, emx_edge_client_stats(v)->disconnects};
        char cmd[64];
        snprintf(cmd, sizeof(cmd), "misbehave Victim %s", bad[i].kind);
        r = ctl(cmd, 3000);
        CHECK(r && strcmp(r, "ok") == 0, "%s: %s", cmd, r ? r : "-");
        CHECK(run_until(disconnected, &wv, 5000), "%s did not drop the edge", bad[i].kind);
        const char *why = emx_edge_client_stats(v)->last_reason;
        CHECK(why && strcmp(why, bad[i].reason) == 0, "%s: reason %s", bad[i].kind,
              why ? why : "-");
        /* It reconnects and re-binds by itself. */
        CHECK(run_until(is_ready, v, 5000), "V did not reconnect after %s", bad[i].kind);
        CHECK(run_until(none_pending, v, 5000), "V re-BIND unanswered");
    }
    check_ledger(v, "V", 0, 2); /* the text message and the bad header */

    /* A large edge answer goes back multipart and is reassembled. */
    next_answer_size = 20000;
    struct emx_edge_client *g = new_client(2, 8192, false, NULL, NULL);
    next_answer_size = 0;
    const char *big[] = {"BigThing"};
    emx_edge_client_bind(g, big, 1);
    REQUIRE(run_until(is_ready, g, 5000), "edge G not ready");
    CHECK(run_until(none_pending, g, 5000), "G BIND unanswered");
    r = ctl("get 2 BigThing Temperature", 5000);
    CHECK(r && strcmp(r, "answer 0x40 SUCCESS") == 0, "multipart edge answer: %s",
          r ? r : "(none)");
    CHECK(emx_edge_client_stats(g)->platform_answers == 1, "G answers");
    check_ledger(g, "G", 0, 0);
    /* The only contract violation all along: the pipe without its boot id. */
    r = ctl("stats", 3000);
    CHECK(r && strstr(r, "{\"violations\":1,"), "platform-sim violations: %s", r ? r : "-");

    /* Exactly one outcome per request, nothing unanswered. */
    check_ledger(a, "A", 1, 0);
    check_ledger(b, "B", 0, 0);
    check_ledger(d, "D", 0, 0);
    CHECK(emx_edge_client_stats(a)->pings_ignored == 0, "unexpected pings");

    struct emx_edge_client *all[] = {a, b, d, p, p2, w, v, g};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        emx_edge_client_free(all[i]);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0, "handles left open");
    if (write(ctl_fd, "shutdown\n", 9) != 9)
        CHECK(0, "shutdown not sent");
    int st = 0;
    waitpid(sim_pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "platform-sim exit status %d", st);
    close(ctl_fd);
    ws_thread_cleanup();
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
