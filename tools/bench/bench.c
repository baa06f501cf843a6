/* edgemux-bench: an edge load generator on libedgeclient. N SDK-like edges
 * AUTH and BIND, then send requests closed-loop (a window per edge) or
 * open-loop (a total rate); latencies after the warm-up go into an HDR-style
 * histogram. Above one process's file limit it re-executes itself as several
 * processes and merges their results. --idle only holds connections (memory
 * measurements); --storm drops every connection at once and times the
 * reconnect. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "ao.h"
#include "edgeclient.h"
#include "hist.h"
#include "ws.h"

#define EDGES_PER_PROC 19000 /* the file limit here is 20,000 per process */
#define MAX_PROCS      64
#define THING_FMT      "Bench-%07u" /* fixed width: every request has the same size */
#define TICK_MS        1

enum phase { PH_CONNECT, PH_WARMUP, PH_MEASURE, PH_DRAIN, PH_HOLD, PH_DONE };
static const char *const phase_names[] = {"connect", "warmup", "measure", "drain", "hold", "done"};

struct edge {
    struct emx_edge_client *c;
    uint32_t inflight;
    uint64_t connecting_ns; /* when the current connection attempt began */
    bool ready_seen;        /* counted in the ready total */
};

/* Everything one process measured; children write it to a file, the parent
 * merges. */
struct result {
    uint32_t edges, ready_at_load;
    double measure_s, all_ready_s, storm_recover_s, gen_lag_max;
    uint64_t issued, refused, answered_window;
    uint64_t outcome[EDGE_OUTCOME_COUNT], by_code[256], setup_by_code[256];
    uint64_t connects, disconnects, unexpected, bad, wrong_ep, storm_a0;
    double throughput;
    double server_cpu_s, own_cpu_s; /* CPU time used inside the measured window */
    struct hist lat, conn;
};

#define MAX_WATCH 8

static struct {
    /* options */
    const char *url, *app_key, *json_path, *result_path, *ips;
    uint32_t nedges, window, size, multipart_size, procs, first_index;
    uint64_t max_requests; /* 0: no limit */
    long watch[MAX_WATCH]; /* server processes whose CPU time is reported */
    uint32_t nwatch;
    double cpu_at_measure, own_at_measure;
    double rate, multipart_share, warmup_s, duration_s, drain_s, connect_spread_s;
    double connect_timeout_s, retry_s;
    bool idle, storm, quiet, deflate, child, no_source;
    /* run state */
    uv_loop_t *loop;
    struct edge *edges;
    uint8_t *params, *mp_params;
    size_t params_len, mp_params_len;
    enum phase phase;
    uint64_t t0, t_load, t_measure, t_end, t_phase_end, t_drain;
    uint64_t last_progress, last_answered, next_edge, rng;
    uint32_t ready;
    uint64_t storm_drop_ns, storm_recover_ns;
    bool stop_requested;
    uv_timer_t tick;
    uv_signal_t sigint, sigterm;
    struct result r;
} G;

static uint64_t rnd(void)
{
    /* xorshift64: load shaping only. */
    G.rng ^= G.rng << 13;
    G.rng ^= G.rng >> 7;
    G.rng ^= G.rng << 17;
    return G.rng;
}

static double secs(uint64_t ns)
{
    return (double)ns / 1e9;
}

/* ---- option parsing ---- */

static bool parse_duration(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || v > 1e6)
        return false;
    if (*end == '\0' || strcmp(end, "s") == 0)
        *out = v;
    else if (strcmp(end, "ms") == 0)
        *out = v / 1000;
    else if (strcmp(end, "m") == 0)
        *out = v * 60;
    else
        return false;
    return true;
}

static bool parse_u32(const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-')
        return false;
    if (strcmp(end, "k") == 0 || strcmp(end, "KiB") == 0)
        v *= 1024;
    else if (strcmp(end, "M") == 0 || strcmp(end, "MiB") == 0)
        v *= 1024 * 1024;
    else if (*end)
        return false;
    if (v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    bool pct = *end == '%';
    if (pct) {
        v /= 100;
        end++;
    }
    if (errno || end == s || *end || !(v >= lo) || v > hi)
        return false;
    *out = v;
    return true;
}

static char *read_key_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char buf[1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n && isspace((unsigned char)buf[n - 1]))
        buf[--n] = '\0';
    return n ? strdup(buf) : NULL;
}

static bool parse_ip_range(const char *s, uint32_t *lo, uint32_t *hi)
{
    char a[64], b[64];
    const char *dash = strchr(s, '-');
    size_t al = dash ? (size_t)(dash - s) : strlen(s);
    if (al == 0 || al >= sizeof(a) || (dash && strlen(dash + 1) >= sizeof(b)))
        return false;
    memcpy(a, s, al);
    a[al] = '\0';
    snprintf(b, sizeof(b), "%s", dash ? dash + 1 : a);
    struct in_addr x, y;
    if (inet_pton(AF_INET, a, &x) != 1 || inet_pton(AF_INET, b, &y) != 1 ||
        ntohl(y.s_addr) < ntohl(x.s_addr))
        return false;
    *lo = ntohl(x.s_addr);
    *hi = ntohl(y.s_addr);
    return true;
}

/* CPU seconds (user + system) of process pid, from /proc; -1 if unknown. */
static double proc_cpu_s(long pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* The name may hold spaces: fields count from after its ')'. */
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    if (!p ||
        sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    long hz = sysconf(_SC_CLK_TCK);
    return hz > 0 ? (double)(ut + st) / (double)hz : -1;
}

static double watched_cpu_s(void)
{
    double t = 0;
    for (uint32_t i = 0; i < G.nwatch; i++) {
        double v = proc_cpu_s(G.watch[i]);
        if (v < 0)
            return -1;
        t += v;
    }
    return t;
}

static double own_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---- load ---- */

static void on_answer(struct emx_edge_client *c, const struct edge_ledger_entry *e, void *arg);

static bool issue(struct edge *ed)
{
    if (G.max_requests && G.r.issued >= G.max_requests)
        return false;
    bool mp = G.multipart_share > 0 && (double)(rnd() % 1000000) / 1e6 < G.multipart_share;
    char thing[32];
    snprintf(thing, sizeof(thing), THING_FMT, (unsigned)(G.first_index + (ed - G.edges)));
    const uint8_t *params = mp ? G.mp_params : G.params;
    size_t plen = mp ? G.mp_params_len : G.params_len;
    uint32_t rid = emx_edge_client_request(ed->c, params ? 0x02 : 0x01, thing, EDGE_CHAR_PROPERTIES,
                                           "Value", params, plen, on_answer, ed);
    if (!rid) {
        G.r.refused++;
        return false;
    }
    ed->inflight++;
    G.r.issued++;
    return true;
}

static bool loading(void)
{
    return G.phase == PH_WARMUP || G.phase == PH_MEASURE;
}

static void on_answer(struct emx_edge_client *c, const struct edge_ledger_entry *e, void *arg)
{
    (void)c;
    struct edge *ed = arg;
    ed->inflight--;
    G.r.outcome[e->outcome]++;
    if (e->outcome != EDGE_ANSWERED)
        return;
    G.r.by_code[e->code]++;
    if (G.storm_drop_ns && !G.storm_recover_ns && e->code == 0xA0)
        G.r.storm_a0++;
    uint64_t now = uv_hrtime();
    /* Throughput and latency count answers that arrive inside the measured
     * window for requests sent inside it (no warm-up traffic). */
    if (G.phase == PH_MEASURE && e->sent_ns >= G.t_measure) {
        G.r.answered_window++;
        hist_record(&G.r.lat, now - e->sent_ns);
    }
    /* Closed loop: each answer releases the next request of that edge. */
    if (G.window && loading() && emx_edge_client_state(ed->c) == EDGE_READY)
        issue(ed);
}

static void on_state(struct emx_edge_client *c, enum edge_state s, void *user)
{
    (void)c;
    struct edge *ed = user;
    if (s == EDGE_CONNECTING) {
        ed->connecting_ns = uv_hrtime();
    } else if (s == EDGE_READY) {
        hist_record(&G.r.conn, uv_hrtime() - ed->connecting_ns);
        if (!ed->ready_seen) {
            ed->ready_seen = true;
            G.ready++;
        }
    } else if (ed->ready_seen && s != EDGE_AUTHING) {
        ed->ready_seen = false;
        G.ready--;
        /* Held connections closed by the server: time their recovery. */
        if (G.phase == PH_HOLD && !G.storm_drop_ns)
            G.storm_drop_ns = uv_hrtime();
    }
}

/* Ready and its BIND answered (nothing else is in flight before the load). */
static bool bound(const struct edge *ed)
{
    return emx_edge_client_state(ed->c) == EDGE_READY && emx_edge_client_pending(ed->c) == 0;
}

static uint32_t count_bound(void)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < G.nedges; i++)
        n += bound(&G.edges[i]);
    return n;
}

static void progress(uint64_t now)
{
    if (G.quiet)
        return;
    uint64_t answered = G.r.outcome[EDGE_ANSWERED];
    double dt = secs(now - G.last_progress);
    uint64_t inflight = 0;
    for (uint32_t i = 0; i < G.nedges; i++)
        inflight += G.edges[i].inflight;
    char who[16] = "";
    if (G.child)
        snprintf(who, sizeof(who), "[e%u..] ", G.first_index);
    fprintf(stderr,
            "%s[%6.1fs] %-7s ready %u/%u sent %" PRIu64 " answered %" PRIu64
            " (%.0f/s) in flight %" PRIu64 " lost %" PRIu64 "\n",
            who, secs(now - G.t0), phase_names[G.phase], G.ready, G.nedges, G.r.issued, answered,
            dt > 0 ? (double)(answered - G.last_answered) / dt : 0.0, inflight,
            G.r.outcome[EDGE_CONNECTION_LOST]);
    G.last_answered = answered;
}

static void finish_run(void)
{
    G.phase = PH_DONE;
    uv_timer_stop(&G.tick);
    for (uint32_t i = 0; i < G.nedges; i++)
        emx_edge_client_stop(G.edges[i].c); /* pending → no_answer */
    uv_close((uv_handle_t *)&G.tick, NULL);
    uv_close((uv_handle_t *)&G.sigint, NULL);
    uv_close((uv_handle_t *)&G.sigterm, NULL);
}

static void start_load(uint64_t now)
{
    G.t_load = now;
    G.r.ready_at_load = count_bound();
    G.r.all_ready_s = secs(now - G.t0);
    if (G.idle || G.storm) {
        G.phase = PH_HOLD;
        G.t_phase_end = now + (uint64_t)(G.duration_s * 1e9);
        if (!G.quiet)
            fprintf(stderr, "edgemux-bench: %u/%u edges ready and bound after %.2fs\n",
                    G.r.ready_at_load, G.nedges, G.r.all_ready_s);
        if (G.storm) {
            /* Every connection fails at once, as if the network dropped. */
            G.storm_drop_ns = now;
            for (uint32_t i = 0; i < G.nedges; i++)
                emx_edge_client_drop(G.edges[i].c);
        }
        return;
    }
    G.phase = PH_WARMUP;
    G.t_measure = now + (uint64_t)(G.warmup_s * 1e9);
    G.t_end = G.t_measure + (uint64_t)(G.duration_s * 1e9);
    if (G.window)
        for (uint32_t i = 0; i < G.nedges; i++)
            if (bound(&G.edges[i]))
                for (uint32_t k = 0; k < G.window; k++)
                    issue(&G.edges[i]);
}

static void open_loop(uint64_t now)
{
    double due = secs(now - G.t_load) * G.rate;
    double lag = due - (double)(G.r.issued + G.r.refused);
    if (lag > G.r.gen_lag_max)
        G.r.gen_lag_max = lag;
    uint32_t budget = 100000; /* a late tick catches up, but boundedly */
    while ((double)(G.r.issued + G.r.refused) + 1 <= due && budget--) {
        bool sent = false;
        for (uint32_t tries = 0; tries < G.nedges && !sent; tries++) {
            struct edge *ed = &G.edges[G.next_edge++ % G.nedges];
            if (emx_edge_client_state(ed->c) == EDGE_READY)
                sent = issue(ed);
        }
        if (!sent) {
            G.r.refused++;
            break;
        }
    }
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    uint64_t now = uv_hrtime();
    if (now - G.last_progress >= 1000000000ull) {
        progress(now);
        G.last_progress = now;
    }
    switch (G.phase) {
    case PH_CONNECT:
        if (G.stop_requested) {
            finish_run();
        } else if (G.ready == G.nedges || secs(now - G.t0) >= G.connect_timeout_s) {
            /* BIND answers follow READY closely; wait for them too. */
            if (count_bound() == G.nedges || secs(now - G.t0) >= G.connect_timeout_s)
                start_load(now);
        }
        break;
    case PH_WARMUP:
    case PH_MEASURE:
        if (G.phase == PH_WARMUP && now >= G.t_measure) {
            G.phase = PH_MEASURE;
            G.cpu_at_measure = watched_cpu_s();
            G.own_at_measure = own_cpu_s();
        }
        if (G.stop_requested || now >= G.t_end ||
            (G.max_requests && G.r.issued >= G.max_requests)) {
            if (G.phase == PH_MEASURE) {
                G.r.measure_s = secs((now < G.t_end ? now : G.t_end) - G.t_measure);
                double c = watched_cpu_s();
                if (G.nwatch && c >= 0 && G.cpu_at_measure >= 0)
                    G.r.server_cpu_s = c - G.cpu_at_measure;
                G.r.own_cpu_s = own_cpu_s() - G.own_at_measure;
            }
            G.phase = PH_DRAIN;
            G.t_drain = now;
            break;
        }
        if (G.window) {
            /* Refill edges that reconnected after losing their window. */
            for (uint32_t i = 0; i < G.nedges; i++) {
                struct edge *ed = &G.edges[i];
                if (ed->inflight == 0 && bound(ed))
                    for (uint32_t k = 0; k < G.window; k++)
                        issue(ed);
            }
        } else {
            open_loop(now);
        }
        break;
    case PH_DRAIN: {
        uint64_t inflight = 0;
        for (uint32_t i = 0; i < G.nedges; i++)
            inflight += G.edges[i].inflight;
        if (inflight == 0 || secs(now - G.t_drain) >= G.drain_s)
            finish_run();
        break;
    }
    case PH_HOLD:
        if (G.rate > 0)
            open_loop(now); /* requests during a storm: only 0xA0 is expected */
        if (G.storm_drop_ns && !G.storm_recover_ns && G.ready == G.nedges &&
            count_bound() == G.nedges) {
            G.storm_recover_ns = now;
            G.r.storm_recover_s = secs(now - G.storm_drop_ns);
            if (!G.quiet)
                fprintf(stderr,
                        "edgemux-bench: all %u edges ready and bound again %.3fs after the drop\n",
                        G.nedges, G.r.storm_recover_s);
        }
        if (G.stop_requested || (G.duration_s > 0 && now >= G.t_phase_end) ||
            (G.storm && G.storm_recover_ns && G.duration_s == 0))
            finish_run();
        break;
    case PH_DONE:
        break;
    }
}

static void on_signal(uv_signal_t *s, int sig)
{
    (void)s, (void)sig;
    if (G.stop_requested)
        G.drain_s = 0;
    G.stop_requested = true;
}

/* ---- results ---- */

static void collect_client_stats(void)
{
    for (uint32_t i = 0; i < G.nedges; i++) {
        const struct edge_client_stats *s = emx_edge_client_stats(G.edges[i].c);
        const struct edge_ledger *l = emx_edge_client_ledger(G.edges[i].c);
        G.r.connects += s->connects;
        G.r.disconnects += s->disconnects;
        G.r.unexpected += s->unexpected_answers;
        G.r.bad += s->bad_messages;
        G.r.wrong_ep += s->wrong_endpoint;
        for (int c = 0; c < 256; c++)
            G.r.setup_by_code[c] += l->by_code[c];
    }
    /* The ledgers count AUTH and BIND too: keep those apart from the load. */
    for (int c = 0; c < 256; c++)
        G.r.setup_by_code[c] -= G.r.by_code[c] <= G.r.setup_by_code[c] ? G.r.by_code[c] : 0;
    G.r.edges = G.nedges;
    G.r.throughput = G.r.measure_s > 0 ? (double)G.r.answered_window / G.r.measure_s : 0;
}

static const char *mode_name(void)
{
    return G.storm ? "storm" : G.idle ? "idle" : G.window ? "closed" : "open";
}

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

static void print_codes(FILE *f, const uint64_t *codes, bool json)
{
    bool first = true;
    for (int c = 0; c < 256; c++) {
        if (!codes[c])
            continue;
        if (json)
            fprintf(f, "%s\"0x%02X\":%" PRIu64, first ? "" : ",", c, codes[c]);
        else
            fprintf(f, " 0x%02X %s %" PRIu64 ";", c, emx_ao_code_name((uint8_t)c), codes[c]);
        first = false;
    }
}

static void print_table(const struct result *r)
{
    const struct hist *l = &r->lat, *c = &r->conn;
    printf("edgemux-bench (%s) %s\n", mode_name(), G.url);
    printf("  edges %u in %u process(es), ready and bound at load start %u, after %.2fs\n",
           r->edges, G.procs, r->ready_at_load, r->all_ready_s);
    if (r->issued || (!G.idle && !G.storm)) {
        printf("  load: %s, request %u bytes, multipart share %.3f (%u-byte params), warm-up "
               "%.1fs, measured %.2fs\n",
               G.window ? "closed loop" : "open loop", G.size, G.multipart_share, G.multipart_size,
               G.warmup_s, r->measure_s);
        if (G.window)
            printf("  window %u per edge\n", G.window);
        else
            printf("  target rate %.0f/s, largest generator lag %.0f requests\n", G.rate,
                   r->gen_lag_max);
        printf("  throughput        %12.1f answers/s\n", r->throughput);
        if (r->measure_s > 0) {
            printf("  CPU in the window  load generator %.0f%%", 100 * r->own_cpu_s / r->measure_s);
            if (r->server_cpu_s > 0)
                printf(", watched server processes %.0f%% (%.0f answers per server CPU-second)",
                       100 * r->server_cpu_s / r->measure_s,
                       (double)r->answered_window / r->server_cpu_s);
            printf("\n");
        }
        printf("  latency (ms)      p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f  mean "
               "%.3f  (n=%" PRIu64 ")\n",
               ms(hist_quantile(l, 0.5)), ms(hist_quantile(l, 0.9)), ms(hist_quantile(l, 0.99)),
               ms(hist_quantile(l, 0.999)), ms(l->max), hist_mean(l) / 1e6, l->count);
        printf("  requests          %" PRIu64 " sent, %" PRIu64 " refused while offline\n",
               r->issued, r->refused);
        printf("  outcomes          answered %" PRIu64 ", no_answer %" PRIu64
               ", connection_lost %" PRIu64 "\n",
               r->outcome[EDGE_ANSWERED], r->outcome[EDGE_NO_ANSWER],
               r->outcome[EDGE_CONNECTION_LOST]);
        printf("  answers by code  ");
        print_codes(stdout, r->by_code, false);
        printf("\n");
    }
    if (r->storm_recover_s > 0)
        printf(
            "  storm: all edges ready and bound again after %.3fs (0xA0 answers meanwhile %" PRIu64
            ")\n",
            r->storm_recover_s, r->storm_a0);
    printf("  connect (TCP+upgrade+AUTH, ms) p50 %.3f  p99 %.3f  max %.3f  (n=%" PRIu64 ")\n",
           ms(hist_quantile(c, 0.5)), ms(hist_quantile(c, 0.99)), ms(c->max), c->count);
    printf("  AUTH/BIND answers");
    print_codes(stdout, r->setup_by_code, false);
    printf("\n  connects %" PRIu64 ", disconnects %" PRIu64 "; server misbehaviour: unexpected "
           "answers %" PRIu64 ", bad messages %" PRIu64 ", wrong endpointId %" PRIu64 "\n",
           r->connects, r->disconnects, r->unexpected, r->bad, r->wrong_ep);
    fflush(stdout);
}

static int write_json(const char *path, const struct result *r)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "edgemux-bench: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    const struct hist *l = &r->lat, *c = &r->conn;
    fprintf(f,
            "{\"tool\":\"edgemux-bench\",\"mode\":\"%s\",\"edges\":%u,\"procs\":%u,"
            "\"window\":%u,\"rate\":%.1f,\"size\":%u,\"multipart_share\":%.4f,"
            "\"multipart_size\":%u,\"warmup_s\":%.3f,\"measured_s\":%.3f,",
            mode_name(), r->edges, G.procs, G.window, G.rate, G.size, G.multipart_share,
            G.multipart_size, G.warmup_s, r->measure_s);
    fprintf(f,
            "\"server_cpu_s\":%.3f,\"generator_cpu_s\":%.3f,\"answers_per_server_cpu_s\":%.1f,"
            "\"throughput\":%.1f,\"latency_ms\":{\"count\":%" PRIu64
            ",\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"p999\":%.4f,\"max\":%.4f,\"mean\":%.4f},",
            r->server_cpu_s, r->own_cpu_s,
            r->server_cpu_s > 0 ? (double)r->answered_window / r->server_cpu_s : 0.0, r->throughput,
            l->count, ms(hist_quantile(l, 0.5)), ms(hist_quantile(l, 0.9)),
            ms(hist_quantile(l, 0.99)), ms(hist_quantile(l, 0.999)), ms(l->max),
            hist_mean(l) / 1e6);
    fprintf(f,
            "\"requests\":%" PRIu64 ",\"refused_offline\":%" PRIu64 ",\"generator_lag_max\":%.0f,"
            "\"outcomes\":{\"answered\":%" PRIu64 ",\"no_answer\":%" PRIu64
            ",\"connection_lost\":%" PRIu64 "},\"answers_by_code\":{",
            r->issued, r->refused, r->gen_lag_max, r->outcome[EDGE_ANSWERED],
            r->outcome[EDGE_NO_ANSWER], r->outcome[EDGE_CONNECTION_LOST]);
    print_codes(f, r->by_code, true);
    fprintf(f, "},\"setup_answers_by_code\":{");
    print_codes(f, r->setup_by_code, true);
    fprintf(f,
            "},\"connect_ms\":{\"count\":%" PRIu64 ",\"p50\":%.4f,\"p99\":%.4f,\"max\":%.4f},"
            "\"ready_at_load\":%u,\"all_ready_s\":%.3f,\"storm_recover_s\":%.3f,"
            "\"storm_a0\":%" PRIu64 ",\"connects\":%" PRIu64 ",\"disconnects\":%" PRIu64
            ",\"server_misbehaviour\":{\"unexpected_answers\":%" PRIu64 ",\"bad_messages\":%" PRIu64
            ",\"wrong_endpoint\":%" PRIu64 "}}\n",
            c->count, ms(hist_quantile(c, 0.5)), ms(hist_quantile(c, 0.99)), ms(c->max),
            r->ready_at_load, r->all_ready_s, r->storm_recover_s, r->storm_a0, r->connects,
            r->disconnects, r->unexpected, r->bad, r->wrong_ep);
    if (fclose(f) != 0)
        return -1;
    return 0;
}

/* Child → parent: one "key value" per line, histograms as sparse buckets. */
static int write_result(const char *path, const struct result *r)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "edges %u\nready_at_load %u\n", r->edges, r->ready_at_load);
    fprintf(f, "measure_s %.9f\nall_ready_s %.9f\nstorm_recover_s %.9f\ngen_lag_max %.1f\n",
            r->measure_s, r->all_ready_s, r->storm_recover_s, r->gen_lag_max);
    fprintf(f, "issued %" PRIu64 "\nrefused %" PRIu64 "\nanswered_window %" PRIu64 "\n", r->issued,
            r->refused, r->answered_window);
    for (int o = 0; o < EDGE_OUTCOME_COUNT; o++)
        fprintf(f, "outcome %d %" PRIu64 "\n", o, r->outcome[o]);
    for (int c = 0; c < 256; c++) {
        if (r->by_code[c])
            fprintf(f, "code %d %" PRIu64 "\n", c, r->by_code[c]);
        if (r->setup_by_code[c])
            fprintf(f, "setup %d %" PRIu64 "\n", c, r->setup_by_code[c]);
    }
    fprintf(f,
            "connects %" PRIu64 "\ndisconnects %" PRIu64 "\nunexpected %" PRIu64 "\nbad %" PRIu64
            "\nwrong_ep %" PRIu64 "\nstorm_a0 %" PRIu64 "\n",
            r->connects, r->disconnects, r->unexpected, r->bad, r->wrong_ep, r->storm_a0);
    const struct hist *hs[2] = {&r->lat, &r->conn};
    for (int k = 0; k < 2; k++) {
        fprintf(f, "hrange %d %" PRIu64 " %" PRIu64 "\n", k, hs[k]->min, hs[k]->max);
        for (size_t i = 0; i < HIST_BUCKETS; i++)
            if (hs[k]->b[i])
                fprintf(f, "hist %d %zu %" PRIu64 "\n", k, i, hs[k]->b[i]);
    }
    return fclose(f) == 0 ? 0 : -1;
}

static bool read_result(const char *path, struct result *r)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    memset(r, 0, sizeof(*r));
    hist_init(&r->lat);
    hist_init(&r->conn);
    uint64_t hmin[2] = {0, 0}, hmax[2] = {0, 0};
    char line[256];
    bool ok = true;
    while (ok && fgets(line, sizeof(line), f)) {
        char key[32];
        unsigned long long a = 0, b = 0, c = 0;
        double d = 0;
        int n;
        if (sscanf(line, "%31s %n", key, &n) != 1) {
            ok = false;
            break;
        }
        const char *v = line + n;
        if (strcmp(key, "measure_s") == 0 || strcmp(key, "all_ready_s") == 0 ||
            strcmp(key, "storm_recover_s") == 0 || strcmp(key, "gen_lag_max") == 0) {
            ok = sscanf(v, "%lf", &d) == 1;
            double *dst = key[0] == 'm'   ? &r->measure_s
                          : key[0] == 'a' ? &r->all_ready_s
                          : key[0] == 's' ? &r->storm_recover_s
                                          : &r->gen_lag_max;
            *dst = d;
        } else if (strcmp(key, "outcome") == 0 || strcmp(key, "code") == 0 ||
                   strcmp(key, "setup") == 0) {
            ok = sscanf(v, "%llu %llu", &a, &b) == 2;
            if (ok && key[0] == 'o')
                ok = a < EDGE_OUTCOME_COUNT && (r->outcome[a] = b, true);
            else if (ok)
                ok = a < 256 && ((key[0] == 'c' ? r->by_code : r->setup_by_code)[a] = b, true);
        } else if (strcmp(key, "hrange") == 0) {
            ok = sscanf(v, "%llu %llu %llu", &a, &b, &c) == 3 && a < 2;
            if (ok) {
                hmin[a] = b;
                hmax[a] = c;
            }
        } else if (strcmp(key, "hist") == 0) {
            ok = sscanf(v, "%llu %llu %llu", &a, &b, &c) == 3 && a < 2;
            ok = ok && hist_add_bucket(a ? &r->conn : &r->lat, (size_t)b, c, hmin[a], hmax[a]);
        } else {
            ok = sscanf(v, "%llu", &a) == 1;
            static const char *const names[] = {
                "edges",       "ready_at_load", "issued", "refused",  "answered_window", "connects",
                "disconnects", "unexpected",    "bad",    "wrong_ep", "storm_a0"};
            uint64_t *dst[] = {NULL,
                               NULL,
                               &r->issued,
                               &r->refused,
                               &r->answered_window,
                               &r->connects,
                               &r->disconnects,
                               &r->unexpected,
                               &r->bad,
                               &r->wrong_ep,
                               &r->storm_a0};
            size_t i = 0;
            while (i < sizeof(names) / sizeof(names[0]) && strcmp(key, names[i]) != 0)
                i++;
            if (i == sizeof(names) / sizeof(names[0]))
                ok = false;
            else if (i == 0)
                r->edges = (uint32_t)a;
            else if (i == 1)
                r->ready_at_load = (uint32_t)a;
            else
                *dst[i] = a;
        }
    }
    fclose(f);
    return ok;
}

static void merge(struct result *into, const struct result *from)
{
    into->edges += from->edges;
    into->ready_at_load += from->ready_at_load;
    /* Processes measure their own windows; the run's throughput is the sum
     * of theirs, its times the slowest process's. */
    if (from->measure_s > into->measure_s)
        into->measure_s = from->measure_s;
    if (from->all_ready_s > into->all_ready_s)
        into->all_ready_s = from->all_ready_s;
    if (from->storm_recover_s > into->storm_recover_s)
        into->storm_recover_s = from->storm_recover_s;
    if (from->gen_lag_max > into->gen_lag_max)
        into->gen_lag_max = from->gen_lag_max;
    into->throughput += from->measure_s > 0 ? (double)from->answered_window / from->measure_s : 0;
    /* Every process watched the same servers over about the same window. */
    if (from->server_cpu_s > into->server_cpu_s)
        into->server_cpu_s = from->server_cpu_s;
    into->own_cpu_s += from->own_cpu_s;
    into->issued += from->issued;
    into->refused += from->refused;
    into->answered_window += from->answered_window;
    for (int o = 0; o < EDGE_OUTCOME_COUNT; o++)
        into->outcome[o] += from->outcome[o];
    for (int c = 0; c < 256; c++) {
        into->by_code[c] += from->by_code[c];
        into->setup_by_code[c] += from->setup_by_code[c];
    }
    into->connects += from->connects;
    into->disconnects += from->disconnects;
    into->unexpected += from->unexpected;
    into->bad += from->bad;
    into->wrong_ep += from->wrong_ep;
    into->storm_a0 += from->storm_a0;
    hist_merge(&into->lat, &from->lat);
    hist_merge(&into->conn, &from->conn);
}

/* ---- processes ---- */

static int run_parent(int argc, char **argv)
{
    static struct result total, part;
    char files[MAX_PROCS][512];
    pid_t pids[MAX_PROCS];
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    char **cargv = calloc((size_t)argc + 16, sizeof(char *));
    if (!cargv)
        return 1;
    int rc = 0;
    uint32_t per = (G.nedges + G.procs - 1) / G.procs, first = 0;
    double total_rate = G.rate;
    for (uint32_t k = 0; k < G.procs; k++) {
        uint32_t n = G.nedges - first < per ? G.nedges - first : per;
        char path[512];
        snprintf(path, sizeof(path), "%s/edgemux-bench-%ld-%u.XXXXXX", tmp, (long)getpid(), k);
        int fd = mkstemp(path);
        if (fd < 0 || strlen(path) >= sizeof(files[k])) {
            /* The file name travels in a fixed buffer: use a short TMPDIR. */
            fprintf(stderr, "edgemux-bench: cannot create a result file in %s\n", tmp);
            if (fd >= 0) {
                close(fd);
                unlink(path);
            }
            pids[k] = -1;
            files[k][0] = '\0';
            rc = 1;
            continue;
        }
        close(fd);
        snprintf(files[k], sizeof(files[k]), "%s", path);
        char s_edges[16], s_first[16], s_rate[32], s_req[32];
        snprintf(s_edges, sizeof(s_edges), "%u", n);
        snprintf(s_first, sizeof(s_first), "%u", first);
        /* Open loop: each process takes its edges' share of the rate. */
        snprintf(s_rate, sizeof(s_rate), "%.3f", total_rate * n / G.nedges);
        int a = 0;
        cargv[a++] = argv[0];
        for (int i = 1; i < argc; i++)
            cargv[a++] = argv[i];
        cargv[a++] = "--child";
        cargv[a++] = "--edges";
        cargv[a++] = s_edges;
        cargv[a++] = "--first-index";
        cargv[a++] = s_first;
        cargv[a++] = "--result";
        cargv[a++] = files[k];
        if (G.max_requests) {
            /* At least one each: --requests 0 is refused. */
            uint64_t share = G.max_requests * n / G.nedges;
            snprintf(s_req, sizeof(s_req), "%" PRIu64, share ? share : 1);
            cargv[a++] = "--requests";
            cargv[a++] = s_req;
        }
        if (!G.window) {
            cargv[a++] = "--rate";
            cargv[a++] = s_rate;
        }
        cargv[a] = NULL;
        pid_t pid = fork();
        if (pid == 0) {
            execv("/proc/self/exe", cargv);
            fprintf(stderr, "edgemux-bench: exec: %s\n", strerror(errno));
            _exit(127);
        }
        pids[k] = pid;
        first += n;
    }
    free(cargv);
    hist_init(&total.lat);
    hist_init(&total.conn);
    for (uint32_t k = 0; k < G.procs; k++) {
        int st = 0;
        if (pids[k] > 0) {
            while (waitpid(pids[k], &st, 0) < 0 && errno == EINTR)
                ;
            if (!WIFEXITED(st) || WEXITSTATUS(st) > 1) {
                fprintf(stderr, "edgemux-bench: process %u failed (status %d)\n", k, st);
                rc = 1;
            } else if (!read_result(files[k], &part)) {
                fprintf(stderr, "edgemux-bench: process %u: unreadable result\n", k);
                rc = 1;
            } else {
                merge(&total, &part);
            }
        }
        if (files[k][0])
            unlink(files[k]);
    }
    print_table(&total);
    if (G.json_path && write_json(G.json_path, &total) != 0)
        rc = 1;
    if (!rc && total.outcome[EDGE_NO_ANSWER])
        rc = 1;
    return rc;
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: edgemux-bench --url ws://HOST:PORT/Thingworx/WS (--app-key K | --app-key-file F)\n"
        "  --edges N               edges (default 100)\n"
        "  --window W              closed loop: W requests in flight per edge (default 1)\n"
        "  --rate R                open loop: R requests per second in total\n"
        "  --size B                bytes of each request message (default 512; 0: a GET)\n"
        "  --multipart-share P     share of requests sent multipart (0..1 or N%%)\n"
        "  --multipart-size B      params bytes of a multipart request (default 64KiB)\n"
        "  --warmup D              load not measured at first (default 2s)\n"
        "  --duration D            measured load (default 10s); with --idle, hold time\n"
        "                          (0: until SIGINT/SIGTERM)\n"
        "  --drain D               wait for in-flight answers (default 10s)\n"
        "  --connect-spread D      random first-connect delay bound (default 1s)\n"
        "  --connect-timeout D     start the load with the edges ready by then (default 60s)\n"
        "  --retry-interval D      reconnect interval after a drop (default 1s)\n"
        "  --source-ips A-B        bind edges round-robin to these IPv4 addresses\n"
        "                          (default 127.0.0.1-127.0.0.254 for a loopback URL)\n"
        "  --no-source-ips         let the kernel pick the source address\n"
        "  --procs P               run as P processes (default: 1 per %u edges)\n"
        "  --watch-pid PID         report this server process's CPU time in the measured\n"
        "                          window (repeatable, up to 8; single process only)\n"
        "  --idle                  connect, AUTH, BIND, hold; no requests\n"
        "  --storm                 after all are bound, drop every connection at once and\n"
        "                          time until all are ready and bound again\n"
        "  --deflate               offer permessage-deflate\n"
        "  --json FILE             write the results as JSON\n"
        "  --quiet                 no progress lines\n"
        "Prints a progress line per second on stderr and a table on stdout.\n"
        "Exit status: 0, 1 if a request had no answer, 2 on usage errors.\n",
        EDGES_PER_PROC);
}

int main(int argc, char **argv)
{
    enum {
        O_URL = 256,
        O_KEY,
        O_KEYFILE,
        O_EDGES,
        O_WINDOW,
        O_RATE,
        O_SIZE,
        O_MPSHARE,
        O_MPSIZE,
        O_WARMUP,
        O_DURATION,
        O_DRAIN,
        O_SPREAD,
        O_CTIMEOUT,
        O_RETRY,
        O_IPS,
        O_NOIPS,
        O_PROCS,
        O_REQUESTS,
        O_WATCH,
        O_IDLE,
        O_STORM,
        O_DEFLATE,
        O_JSON,
        O_QUIET,
        O_CHILD,
        O_FIRST,
        O_RESULT,
        O_HELP
    };
    static const struct option opts[] = {{"url", required_argument, NULL, O_URL},
                                         {"app-key", required_argument, NULL, O_KEY},
                                         {"app-key-file", required_argument, NULL, O_KEYFILE},
                                         {"edges", required_argument, NULL, O_EDGES},
                                         {"window", required_argument, NULL, O_WINDOW},
                                         {"rate", required_argument, NULL, O_RATE},
                                         {"size", required_argument, NULL, O_SIZE},
                                         {"multipart-share", required_argument, NULL, O_MPSHARE},
                                         {"multipart-size", required_argument, NULL, O_MPSIZE},
                                         {"warmup", required_argument, NULL, O_WARMUP},
                                         {"duration", required_argument, NULL, O_DURATION},
                                         {"drain", required_argument, NULL, O_DRAIN},
                                         {"connect-spread", required_argument, NULL, O_SPREAD},
                                         {"connect-timeout", required_argument, NULL, O_CTIMEOUT},
                                         {"retry-interval", required_argument, NULL, O_RETRY},
                                         {"source-ips", required_argument, NULL, O_IPS},
                                         {"no-source-ips", no_argument, NULL, O_NOIPS},
                                         {"procs", required_argument, NULL, O_PROCS},
                                         {"requests", required_argument, NULL, O_REQUESTS},
                                         {"watch-pid", required_argument, NULL, O_WATCH},
                                         {"idle", no_argument, NULL, O_IDLE},
                                         {"storm", no_argument, NULL, O_STORM},
                                         {"deflate", no_argument, NULL, O_DEFLATE},
                                         {"json", required_argument, NULL, O_JSON},
                                         {"quiet", no_argument, NULL, O_QUIET},
                                         {"child", no_argument, NULL, O_CHILD},
                                         {"first-index", required_argument, NULL, O_FIRST},
                                         {"result", required_argument, NULL, O_RESULT},
                                         {"help", no_argument, NULL, O_HELP},
                                         {0, 0, 0, 0}};
    G.nedges = 100;
    G.size = 512;
    G.multipart_size = 64 * 1024;
    G.warmup_s = 2;
    G.duration_s = 10;
    G.drain_s = 10;
    G.connect_spread_s = 1;
    G.connect_timeout_s = 60;
    G.retry_s = 1;
    char *key = NULL;
    bool have_window = false;
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        bool ok = true;
        switch (o) {
        case O_URL:
            G.url = optarg;
            break;
        case O_KEY:
            free(key);
            key = strdup(optarg);
            ok = key && *key;
            break;
        case O_KEYFILE:
            free(key);
            key = read_key_file(optarg);
            ok = key != NULL;
            break;
        case O_EDGES:
            ok = parse_u32(optarg, &G.nedges) && G.nedges >= 1 && G.nedges <= 1000000;
            break;
        case O_WINDOW:
            ok = parse_u32(optarg, &G.window) && G.window >= 1 && G.window <= 10000;
            have_window = true;
            break;
        case O_RATE:
            ok = parse_double(optarg, 0.001, 1e8, &G.rate);
            break;
        case O_SIZE:
            ok = parse_u32(optarg, &G.size) && G.size <= 64u * 1024 * 1024;
            break;
        case O_MPSHARE:
            ok = parse_double(optarg, 0, 1, &G.multipart_share);
            break;
        case O_MPSIZE:
            ok = parse_u32(optarg, &G.multipart_size) && G.multipart_size >= 1 &&
                 G.multipart_size <= 64u * 1024 * 1024;
            break;
        case O_WARMUP:
            ok = parse_duration(optarg, &G.warmup_s);
            break;
        case O_DURATION:
            ok = parse_duration(optarg, &G.duration_s);
            break;
        case O_DRAIN:
            ok = parse_duration(optarg, &G.drain_s);
            break;
        case O_SPREAD:
            ok = parse_duration(optarg, &G.connect_spread_s);
            break;
        case O_CTIMEOUT:
            ok = parse_duration(optarg, &G.connect_timeout_s);
            break;
        case O_RETRY:
            ok = parse_duration(optarg, &G.retry_s) && G.retry_s >= 0.001;
            break;
        case O_IPS:
            G.ips = optarg;
            break;
        case O_NOIPS:
            G.no_source = true;
            break;
        case O_PROCS:
            ok = parse_u32(optarg, &G.procs) && G.procs >= 1 && G.procs <= MAX_PROCS;
            break;
        case O_REQUESTS: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            ok = !errno && end != optarg && !*end && optarg[0] != '-' && v >= 1;
            G.max_requests = v;
            break;
        }
        case O_WATCH: {
            uint32_t pid;
            ok = G.nwatch < MAX_WATCH && parse_u32(optarg, &pid) && pid > 0 && proc_cpu_s(pid) >= 0;
            if (ok)
                G.watch[G.nwatch++] = pid;
            break;
        }
        case O_IDLE:
            G.idle = true;
            break;
        case O_STORM:
            G.storm = true;
            break;
        case O_DEFLATE:
            G.deflate = true;
            break;
        case O_JSON:
            G.json_path = optarg;
            break;
        case O_QUIET:
            G.quiet = true;
            break;
        case O_CHILD:
            G.child = true;
            break;
        case O_FIRST:
            ok = parse_u32(optarg, &G.first_index);
            break;
        case O_RESULT:
            G.result_path = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "edgemux-bench: bad value for --%s: %s\n", opts[o - O_URL].name,
                    optarg ? optarg : "");
            return 2;
        }
    }
    if (optind < argc || !G.url || !key) {
        fprintf(stderr, "edgemux-bench: --url and --app-key (or --app-key-file) are required\n");
        usage(stderr);
        return 2;
    }
    if (G.rate > 0 && have_window) {
        fprintf(stderr, "edgemux-bench: --rate (open loop) and --window (closed loop) exclude "
                        "each other\n");
        return 2;
    }
    if (G.rate == 0 && !G.window)
        G.window = 1;
    if (G.child && !G.result_path) {
        fprintf(stderr, "edgemux-bench: --child needs --result\n");
        return 2;
    }
    uint32_t ip_lo = 0, ip_hi = 0;
    bool use_ips = false;
    if (G.ips) {
        if (!parse_ip_range(G.ips, &ip_lo, &ip_hi)) {
            fprintf(stderr, "edgemux-bench: bad --source-ips %s\n", G.ips);
            return 2;
        }
        use_ips = true;
    } else if (!G.no_source && strncmp(G.url, "ws://127.", 9) == 0) {
        /* Loopback: 254 source addresses give 254 ephemeral port ranges. */
        parse_ip_range("127.0.0.1-127.0.0.254", &ip_lo, &ip_hi);
        use_ips = true;
    }
    if (!G.child) {
        if (!G.procs)
            G.procs = (G.nedges + EDGES_PER_PROC - 1) / EDGES_PER_PROC;
        if (G.procs > G.nedges)
            G.procs = G.nedges;
        if (G.procs > 1) {
            free(key);
            return run_parent(argc, argv);
        }
    } else {
        G.procs = 1;
    }
    /* Thousands of edges need thousands of descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)G.nedges + 64 > rl.rlim_cur) {
            fprintf(stderr, "edgemux-bench: %u edges need more than %llu open files: use --procs\n",
                    G.nedges, (unsigned long long)rl.rlim_cur);
            return 2;
        }
    }
    G.loop = uv_default_loop();
    G.rng = uv_hrtime() | 1;
    hist_init(&G.r.lat);
    hist_init(&G.r.conn);

    /* Params sized so that the whole request message is --size bytes. */
    if (G.size) {
        char thing[32];
        size_t tl = (size_t)snprintf(thing, sizeof(thing), THING_FMT, 0u);
        size_t fixed = EMX_AO_HEADER_SIZE + 1 + emx_ao_str_size(tl) + 1 + emx_ao_str_size(5) + 1 +
                       1 + ao_infotable_blob_size("Value", 0);
        if (G.size < fixed + 1) {
            fprintf(stderr, "edgemux-bench: --size must be 0 or at least %zu\n", fixed + 1);
            return 2;
        }
        size_t dl = G.size - fixed;
        /* A blob length over 127 takes a 4-byte length: keep the total exact. */
        size_t cap = ao_infotable_blob_size("Value", dl);
        while (dl > 1 && cap + fixed - ao_infotable_blob_size("Value", 0) > G.size)
            cap = ao_infotable_blob_size("Value", --dl);
        uint8_t *fill = malloc(dl);
        G.params = fill ? malloc(cap) : NULL;
        if (!G.params)
            return 1;
        for (size_t i = 0; i < dl; i++)
            fill[i] = (uint8_t)('a' + i % 26);
        G.params_len = ao_infotable_blob(G.params, cap, "Value", fill, dl);
        free(fill);
    }
    if (G.multipart_share > 0) {
        uint8_t *fill = calloc(1, G.multipart_size);
        size_t cap = ao_infotable_blob_size("Value", G.multipart_size);
        G.mp_params = fill ? malloc(cap) : NULL;
        if (!G.mp_params)
            return 1;
        G.mp_params_len = ao_infotable_blob(G.mp_params, cap, "Value", fill, G.multipart_size);
        free(fill);
    }

    struct edge_client_config cfg = {
        .url = G.url,
        .app_key = key,
        .deflate = G.deflate,
        .max_connect_delay_ms = (uint32_t)(G.connect_spread_s * 1000) + 1,
        .connect_retry_interval_ms = (uint32_t)(G.retry_s * 1000),
        .on_state = on_state,
    };
    G.edges = calloc(G.nedges, sizeof(*G.edges));
    if (!G.edges)
        return 1;
    for (uint32_t i = 0; i < G.nedges; i++) {
        char src[INET_ADDRSTRLEN];
        if (use_ips) {
            uint32_t idx = G.first_index + i;
            struct in_addr a = {htonl(ip_lo + idx % (ip_hi - ip_lo + 1))};
            inet_ntop(AF_INET, &a, src, sizeof(src));
            cfg.source_ip = src;
        }
        cfg.user = &G.edges[i];
        G.edges[i].c = emx_edge_client_new(G.loop, &cfg);
        if (!G.edges[i].c) {
            fprintf(stderr, "edgemux-bench: cannot create edge %u (bad --url?)\n", i);
            return 2;
        }
        char thing[32];
        snprintf(thing, sizeof(thing), THING_FMT, G.first_index + i);
        const char *names[1] = {thing};
        emx_edge_client_bind(G.edges[i].c, names, 1);
        emx_edge_client_start(G.edges[i].c);
    }
    G.t0 = G.last_progress = uv_hrtime();
    G.phase = PH_CONNECT;
    uv_timer_init(G.loop, &G.tick);
    uv_timer_start(&G.tick, on_tick, TICK_MS, TICK_MS);
    uv_signal_init(G.loop, &G.sigint);
    uv_signal_start(&G.sigint, on_signal, SIGINT);
    uv_signal_init(G.loop, &G.sigterm);
    uv_signal_start(&G.sigterm, on_signal, SIGTERM);
    uv_run(G.loop, UV_RUN_DEFAULT);

    collect_client_stats();
    int rc = 0;
    if (G.child) {
        if (write_result(G.result_path, &G.r) != 0) {
            fprintf(stderr, "edgemux-bench: cannot write %s\n", G.result_path);
            rc = 2;
        }
    } else {
        print_table(&G.r);
        if (G.json_path && write_json(G.json_path, &G.r) != 0)
            rc = 2;
    }
    if (!rc && G.r.outcome[EDGE_NO_ANSWER])
        rc = 1;
    for (uint32_t i = 0; i < G.nedges; i++)
        emx_edge_client_free(G.edges[i].c);
    uv_run(G.loop, UV_RUN_DEFAULT);
    uv_loop_close(G.loop);
    free(G.edges);
    free(G.params);
    free(G.mp_params);
    free(key);
    ws_thread_cleanup();
    return rc;
}
