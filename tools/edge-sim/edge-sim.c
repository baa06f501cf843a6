/* edge-sim: many SDK-like edges on one loop (libedgeclient), a request load,
 * a progress line per second and a summary with the ledger's outcomes.
 * Exits non-zero when any request ended with no answer. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

#include "ao.h"
#include "edgeclient.h"
#include "ws.h"

struct edge {
    struct emx_edge_client *c;
    char **things;
};

static struct {
    uv_loop_t *loop;
    struct edge *edges;
    uint32_t nedges, nthings;
    double rate; /* requests per second per edge */
    uint32_t size, multipart_size;
    double multipart_share;
    double duration_s, drain_s;
    const char *ledger_path;
    bool quiet, strict;
    uint8_t *params, *mp_params;
    size_t params_len, mp_params_len;
    uint64_t start_ns, issued, refused, next_edge;
    bool stopping, done;
    uint64_t stop_ns;
    uv_timer_t tick;
    uv_signal_t sigint;
    uint64_t last_progress_ns;
    uint64_t rng;
    /* --tunnel-echo-port: a TCP echo server standing for tunnel targets. */
    bool echo_on;
    uv_tcp_t echo;
    uint64_t echo_conns, echo_bytes;
} G;

/* ---- the tunnel targets' echo server ---- */

#define ECHO_HIGH_MARK (1u << 20)

struct echo_conn {
    uv_tcp_t tcp;
    struct echo_conn *prev, *next; /* G.echo_list */
    bool reading;
};

static struct echo_conn *echo_list;

struct echo_write {
    uv_write_t req;
    struct echo_conn *e;
    char data[];
};

static void echo_closed(uv_handle_t *h)
{
    struct echo_conn *e = h->data;
    if (e->prev)
        e->prev->next = e->next;
    else if (echo_list == e)
        echo_list = e->next;
    if (e->next)
        e->next->prev = e->prev;
    free(e);
}

static void echo_close_all(void)
{
    for (struct echo_conn *e = echo_list; e; e = e->next)
        if (!uv_is_closing((uv_handle_t *)&e->tcp))
            uv_close((uv_handle_t *)&e->tcp, echo_closed);
}

static void echo_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)h;
    (void)sz;
    static char scratch[65536];
    *buf = uv_buf_init(scratch, sizeof(scratch));
}

static void echo_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void echo_written(uv_write_t *req, int status)
{
    struct echo_write *w = (struct echo_write *)req;
    struct echo_conn *e = w->e;
    free(w);
    if (status < 0 || uv_is_closing((uv_handle_t *)&e->tcp))
        return;
    if (!e->reading && uv_stream_get_write_queue_size((uv_stream_t *)&e->tcp) < ECHO_HIGH_MARK) {
        e->reading = true;
        uv_read_start((uv_stream_t *)&e->tcp, echo_alloc, echo_read);
    }
}

static void echo_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct echo_conn *e = s->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (!uv_is_closing((uv_handle_t *)s))
            uv_close((uv_handle_t *)s, echo_closed);
        return;
    }
    struct echo_write *w = malloc(sizeof(*w) + (size_t)nread);
    if (!w) {
        uv_close((uv_handle_t *)s, echo_closed);
        return;
    }
    w->e = e;
    memcpy(w->data, buf->base, (size_t)nread);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)nread);
    if (uv_write(&w->req, s, &b, 1, echo_written) != 0) {
        free(w);
        uv_close((uv_handle_t *)s, echo_closed);
        return;
    }
    G.echo_bytes += (uint64_t)nread;
    if (uv_stream_get_write_queue_size(s) >= ECHO_HIGH_MARK) {
        e->reading = false;
        uv_read_stop(s);
    }
}

static void echo_on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    struct echo_conn *e = calloc(1, sizeof(*e));
    if (!e)
        return;
    uv_tcp_init(G.loop, &e->tcp);
    e->tcp.data = e;
    e->next = echo_list;
    if (echo_list)
        echo_list->prev = e;
    echo_list = e;
    if (uv_accept(server, (uv_stream_t *)&e->tcp) != 0) {
        uv_close((uv_handle_t *)&e->tcp, echo_closed);
        return;
    }
    G.echo_conns++;
    uv_tcp_nodelay(&e->tcp, 1);
    e->reading = true;
    uv_read_start((uv_stream_t *)&e->tcp, echo_alloc, echo_read);
}

static int echo_listen(uint32_t port)
{
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", (int)port, &sa);
    uv_tcp_init(G.loop, &G.echo);
    int rc = uv_tcp_bind(&G.echo, (struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&G.echo, 128, echo_on_connection);
    int l = sizeof(sa);
    if (rc == 0)
        rc = uv_tcp_getsockname(&G.echo, (struct sockaddr *)&sa, &l);
    if (rc != 0)
        return rc;
    G.echo_on = true;
    printf("edge-sim tunnel-echo port=%u\n", ntohs(sa.sin_port));
    fflush(stdout);
    return 0;
}

static uint64_t rnd(void)
{
    /* xorshift64: load shaping only, not security. */
    G.rng ^= G.rng << 13;
    G.rng ^= G.rng >> 7;
    G.rng ^= G.rng << 17;
    return G.rng;
}

static bool parse_duration(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0)
        return false;
    if (strcmp(end, "") == 0 || strcmp(end, "s") == 0)
        *out = v;
    else if (strcmp(end, "ms") == 0)
        *out = v / 1000;
    else if (strcmp(end, "m") == 0)
        *out = v * 60;
    else if (strcmp(end, "h") == 0)
        *out = v * 3600;
    else
        return false;
    return true;
}

static bool parse_u32(const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || v > UINT32_MAX)
        return false;
    if (*end == 'k' || *end == 'K') {
        v *= 1024;
        end++;
        if (*end == 'i' || *end == 'B')
            end += *end == 'i' ? 2 : 1;
    } else if (*end == 'M') {
        v *= 1024 * 1024;
        end++;
        if (*end == 'i' || *end == 'B')
            end += *end == 'i' ? 2 : 1;
    }
    if (*end || v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

static bool parse_share(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s)
        return false;
    if (*end == '%') {
        v /= 100;
        end++;
    }
    if (*end || v < 0 || v > 1)
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

static void issue_one(void)
{
    for (uint32_t tries = 0; tries < G.nedges; tries++) {
        struct edge *e = &G.edges[G.next_edge++ % G.nedges];
        if (emx_edge_client_state(e->c) != EDGE_READY)
            continue;
        bool mp = G.multipart_share > 0 && (double)(rnd() % 1000000) / 1e6 < G.multipart_share;
        const char *thing = e->things[rnd() % G.nthings];
        const uint8_t *params = mp ? G.mp_params : G.params;
        size_t plen = mp ? G.mp_params_len : G.params_len;
        uint32_t rid =
            emx_edge_client_request(e->c, params ? 0x02 : 0x01, thing, EDGE_CHAR_PROPERTIES,
                                    "Value", params, plen, NULL, NULL);
        if (rid) {
            G.issued++;
            return;
        }
    }
    G.refused++;
}

struct totals {
    uint64_t by_outcome[EDGE_OUTCOME_COUNT], by_code[256], count;
    uint64_t ready, connects, disconnects, pings_ignored, unexpected, bad, wrong_ep;
    uint32_t max_frame;
    struct edge_tunnel_stats tun;
};

static void collect(struct totals *t)
{
    memset(t, 0, sizeof(*t));
    for (uint32_t i = 0; i < G.nedges; i++) {
        const struct edge_ledger *l = emx_edge_client_ledger(G.edges[i].c);
        const struct edge_client_stats *s = emx_edge_client_stats(G.edges[i].c);
        for (int o = 0; o < EDGE_OUTCOME_COUNT; o++)
            t->by_outcome[o] += l->by_outcome[o];
        for (int c = 0; c < 256; c++)
            t->by_code[c] += l->by_code[c];
        t->count += l->count;
        t->ready += emx_edge_client_state(G.edges[i].c) == EDGE_READY;
        t->connects += s->connects;
        t->disconnects += s->disconnects;
        t->pings_ignored += s->pings_ignored;
        t->unexpected += s->unexpected_answers;
        t->bad += s->bad_messages;
        t->wrong_ep += s->wrong_endpoint;
        if (s->max_frame_in > t->max_frame)
            t->max_frame = s->max_frame_in;
        emx_edge_tunnel_stats_add(&t->tun, emx_edge_client_tunnel_stats(G.edges[i].c));
    }
}

static void progress(uint64_t now)
{
    if (G.quiet)
        return;
    struct totals t;
    collect(&t);
    double el = (double)(now - G.start_ns) / 1e9;
    fprintf(stderr,
            "[%6.1fs] ready %" PRIu64 "/%u sent %" PRIu64 " answered %" PRIu64 " pending %" PRIu64
            " lost %" PRIu64 " refused-offline %" PRIu64 " disconnects %" PRIu64
            " tunnels %" PRIu64 "\n",
            el, t.ready, G.nedges, G.issued, t.by_outcome[EDGE_ANSWERED],
            t.by_outcome[EDGE_PENDING], t.by_outcome[EDGE_CONNECTION_LOST], G.refused,
            t.disconnects, t.tun.active);
}

static void on_tick(uv_timer_t *tm)
{
    uint64_t now = uv_hrtime();
    double el = (double)(now - G.start_ns) / 1e9;
    if (now - G.last_progress_ns >= 1000000000ull) {
        G.last_progress_ns = now;
        progress(now);
    }
    if (!G.stopping && el >= G.duration_s) {
        G.stopping = true;
        G.stop_ns = now;
    }
    if (!G.stopping) {
        /* Requests due so far at the total rate, spread over ready edges. */
        double due = el * G.rate * G.nedges;
        uint64_t target = (uint64_t)due;
        uint32_t budget = 10000; /* per tick, so one slow tick cannot snowball */
        while (G.issued + G.refused < target && budget--)
            issue_one();
        return;
    }
    uint64_t pending = 0;
    for (uint32_t i = 0; i < G.nedges; i++)
        pending += emx_edge_client_pending(G.edges[i].c);
    if (pending == 0 || (double)(now - G.stop_ns) / 1e9 >= G.drain_s) {
        G.done = true;
        uv_timer_stop(tm);
        for (uint32_t i = 0; i < G.nedges; i++)
            emx_edge_client_stop(G.edges[i].c);
        uv_close((uv_handle_t *)&G.sigint, NULL);
        uv_close((uv_handle_t *)tm, NULL);
        if (G.echo_on) {
            uv_close((uv_handle_t *)&G.echo, NULL);
            echo_close_all();
        }
    }
}

static void on_sigint(uv_signal_t *s, int sig)
{
    (void)s, (void)sig;
    if (!G.stopping) {
        G.stopping = true;
        G.stop_ns = uv_hrtime();
    } else {
        G.drain_s = 0;
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int summary(void)
{
    struct totals t;
    collect(&t);
    uint32_t *lat = malloc((t.by_outcome[EDGE_ANSWERED] + 1) * sizeof(*lat));
    size_t n = 0;
    for (uint32_t i = 0; lat && i < G.nedges; i++) {
        const struct edge_ledger *l = emx_edge_client_ledger(G.edges[i].c);
        for (size_t k = 0; k < l->count; k++)
            if (l->entries[k].outcome == EDGE_ANSWERED)
                lat[n++] = l->entries[k].latency_us;
    }
    if (lat && n)
        qsort(lat, n, sizeof(*lat), cmp_u32);
    double el = (double)(G.stop_ns - G.start_ns) / 1e9;
    printf("edge-sim summary\n");
    printf("  edges %u, duration %.1fs, requests %" PRIu64
           " (%.1f/s), refused while offline %" PRIu64 "\n",
           G.nedges, el, t.count, el > 0 ? (double)t.count / el : 0.0, G.refused);
    printf("  outcomes: answered %" PRIu64 ", no_answer %" PRIu64 ", connection_lost %" PRIu64 "\n",
           t.by_outcome[EDGE_ANSWERED], t.by_outcome[EDGE_NO_ANSWER],
           t.by_outcome[EDGE_CONNECTION_LOST]);
    printf("  answers by code:");
    for (int c = 0; c < 256; c++)
        if (t.by_code[c])
            printf(" 0x%02X %s %" PRIu64 ";", c, emx_ao_code_name((uint8_t)c), t.by_code[c]);
    printf("\n");
    if (n)
        printf("  latency: p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", lat[n / 2] / 1000.0,
               lat[(size_t)((double)(n - 1) * 0.99)] / 1000.0, lat[n - 1] / 1000.0);
    printf("  connects %" PRIu64 ", disconnects %" PRIu64 ", server pings ignored %" PRIu64
           ", largest frame received %u\n",
           t.connects, t.disconnects, t.pings_ignored, t.max_frame);
    printf("  server misbehaviour: unexpected answers %" PRIu64 ", bad messages %" PRIu64
           ", wrong endpointId %" PRIu64 "\n",
           t.unexpected, t.bad, t.wrong_ep);
    const struct edge_tunnel_stats *u = &t.tun;
    printf("  tunnels: requests=%" PRIu64 " refused=%" PRIu64 " opened=%" PRIu64
           " upgrade_refused=%" PRIu64 " last_refused_status=%u upgrade_failed=%" PRIu64
           " closed=%" PRIu64 " active=%" PRIu64 " cancels_sent=%" PRIu64
           " disconnects_sent=%" PRIu64 " control_failed=%" PRIu64 " completes=%" PRIu64
           " commands=%" PRIu64 "\n",
           u->requests, u->refused, u->opened, u->upgrade_refused, u->last_refused_status,
           u->upgrade_failed, u->closed, u->active, u->cancels_sent, u->disconnects_sent,
           u->control_failed, u->completes, u->commands);
    printf("  tunnel data: bytes_to_platform=%" PRIu64 " bytes_from_platform=%" PRIu64
           " msgs_to_platform=%" PRIu64 " msgs_from_platform=%" PRIu64 " glued_bytes=%" PRIu64
           " binary_dropped=%" PRIu64 " oversize_dropped=%" PRIu64 " bad_base64=%" PRIu64
           " no_target=%" PRIu64 " max_frame_in=%u\n",
           u->bytes_to_platform, u->bytes_from_platform, u->msgs_to_platform,
           u->msgs_from_platform, u->glued_bytes, u->binary_dropped, u->oversize_dropped,
           u->bad_base64, u->no_target, u->max_frame_in);
    printf("  tunnel events: target_connects=%" PRIu64 " target_failures=%" PRIu64
           " target_write_errors=%" PRIu64 " server_closes=%" PRIu64 " socket_errors=%" PRIu64
           " idle_timeouts=%" PRIu64 " pings_ignored=%" PRIu64 " foreign_stop_reason=%" PRIu64
           " echo_conns=%" PRIu64 " echo_bytes=%" PRIu64 "\n",
           u->target_connects, u->target_failures, u->target_write_errors, u->server_closes,
           u->socket_errors, u->idle_timeouts, u->pings_ignored, u->foreign_stop_reason,
           G.echo_conns, G.echo_bytes);
    free(lat);
    int rc = 0;
    if (G.ledger_path) {
        FILE *f = fopen(G.ledger_path, "w");
        if (!f) {
            fprintf(stderr, "edge-sim: cannot write %s\n", G.ledger_path);
            rc = 2;
        } else {
            fputs("[", f);
            bool first = true;
            for (uint32_t i = 0; i < G.nedges; i++) {
                const struct edge_ledger *l = emx_edge_client_ledger(G.edges[i].c);
                char name[32];
                snprintf(name, sizeof(name), "edge-%u", i);
                emx_edge_ledger_write_json(l, name, f, first);
                if (l->count)
                    first = false;
            }
            fputs("\n]\n", f);
            if (fclose(f) != 0)
                rc = 2;
        }
    }
    if (t.by_outcome[EDGE_NO_ANSWER])
        rc = 1;
    if (G.strict && (t.unexpected || t.bad || t.wrong_ep))
        rc = 1;
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: edge-sim --url ws://HOST:PORT/Thingworx/WS (--app-key K | --app-key-file F)\n"
            "  --edges N              edges (default 1)\n"
            "  --rate R               requests per second per edge (default 1)\n"
            "  --size B               params bytes per request (0: GET without params)\n"
            "  --multipart-share P    share of requests sent multipart (0..1 or N%%)\n"
            "  --multipart-size B     params bytes of a multipart request (default 64KiB)\n"
            "  --things K             Things bound per edge (default 1)\n"
            "  --duration D           load duration (30s, 2m; default 10s)\n"
            "  --drain D              wait this long for in-flight answers (default 12s)\n"
            "  --max-frame-size B     announced Max-Frame-Size (default 8192)\n"
            "  --chunk-size B         multipart chunk size (default 8192)\n"
            "  --deflate              offer permessage-deflate\n"
            "  --source-ips A-B       bind edges round-robin to IPv4 addresses A..B\n"
            "  --max-connect-delay D  random first-connect delay bound (default 1s)\n"
            "  --retry-interval D     reconnect interval (default 1s)\n"
            "  --ping-interval D      edge pings (default 55s)\n"
            "  --answer-pings         answer server pings (the SDK does not)\n"
            "  --ledger FILE          write every request and its outcome as JSON\n"
            "  --strict               also fail on server misbehaviour\n"
            "  --tunnel-echo-port P   run a TCP echo server on 127.0.0.1:P for tunnel\n"
            "                         targets (0: any port; prints 'edge-sim tunnel-echo port=P')\n"
            "  --no-tunnels           ignore tunnel services (SDK without ENABLE_TUNNELING)\n"
            "  --max-tunnels N        concurrent tunnels per edge (default 64)\n"
            "  --quiet                no progress lines\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"url", required_argument, NULL, 'u'},
                                         {"edges", required_argument, NULL, 'e'},
                                         {"app-key", required_argument, NULL, 'k'},
                                         {"app-key-file", required_argument, NULL, 'K'},
                                         {"rate", required_argument, NULL, 'r'},
                                         {"size", required_argument, NULL, 's'},
                                         {"multipart-share", required_argument, NULL, 'p'},
                                         {"multipart-size", required_argument, NULL, 'S'},
                                         {"things", required_argument, NULL, 't'},
                                         {"duration", required_argument, NULL, 'd'},
                                         {"drain", required_argument, NULL, 'D'},
                                         {"max-frame-size", required_argument, NULL, 'f'},
                                         {"chunk-size", required_argument, NULL, 'c'},
                                         {"deflate", no_argument, NULL, 'z'},
                                         {"source-ips", required_argument, NULL, 'i'},
                                         {"max-connect-delay", required_argument, NULL, 'M'},
                                         {"retry-interval", required_argument, NULL, 'R'},
                                         {"ping-interval", required_argument, NULL, 'P'},
                                         {"answer-pings", no_argument, NULL, 'a'},
                                         {"ledger", required_argument, NULL, 'l'},
                                         {"strict", no_argument, NULL, 'x'},
                                         {"quiet", no_argument, NULL, 'q'},
                                         {"tunnel-echo-port", required_argument, NULL, 'E'},
                                         {"no-tunnels", no_argument, NULL, 'T'},
                                         {"max-tunnels", required_argument, NULL, 'N'},
                                         {"help", no_argument, NULL, 'h'},
                                         {0, 0, 0, 0}};
    struct edge_client_config cfg = {0};
    char *key = NULL;
    const char *ips = NULL;
    double d;
    uint32_t echo_port = 0;
    bool want_echo = false;
    G.nedges = 1;
    G.nthings = 1;
    G.rate = 1;
    G.duration_s = 10;
    G.drain_s = 12;
    G.multipart_size = 64 * 1024;
    cfg.max_connect_delay_ms = 1000;
    cfg.connect_retry_interval_ms = 1000;
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        bool ok = true;
        switch (o) {
        case 'u':
            cfg.url = optarg;
            break;
        case 'e':
            ok = parse_u32(optarg, &G.nedges) && G.nedges > 0;
            break;
        case 'k':
            free(key);
            key = strdup(optarg);
            break;
        case 'K':
            free(key);
            ok = (key = read_key_file(optarg)) != NULL;
            break;
        case 'r': {
            char *end;
            G.rate = strtod(optarg, &end);
            ok = end != optarg && !*end && G.rate >= 0 && isfinite(G.rate);
            break;
        }
        case 's':
            ok = parse_u32(optarg, &G.size);
            break;
        case 'p':
            ok = parse_share(optarg, &G.multipart_share);
            break;
        case 'S':
            ok = parse_u32(optarg, &G.multipart_size);
            break;
        case 't':
            ok = parse_u32(optarg, &G.nthings) && G.nthings > 0 && G.nthings <= 65535;
            break;
        case 'd':
            ok = parse_duration(optarg, &G.duration_s);
            break;
        case 'D':
            ok = parse_duration(optarg, &G.drain_s);
            break;
        case 'f':
            ok = parse_u32(optarg, &cfg.max_frame_size) && cfg.max_frame_size >= 128;
            break;
        case 'c':
            ok = parse_u32(optarg, &cfg.chunk_size) && cfg.chunk_size >= 128 &&
                 cfg.chunk_size <= 0xFFFF;
            break;
        case 'z':
            cfg.deflate = true;
            break;
        case 'i':
            ips = optarg;
            break;
        case 'M':
            ok = parse_duration(optarg, &d) && d * 1000 < UINT32_MAX;
            cfg.max_connect_delay_ms = d > 0 ? (uint32_t)(d * 1000) : 1;
            break;
        case 'R':
            ok = parse_duration(optarg, &d) && d * 1000 < UINT32_MAX;
            cfg.connect_retry_interval_ms = d > 0 ? (uint32_t)(d * 1000) : 1;
            break;
        case 'P':
            ok = parse_duration(optarg, &d) && d * 1000 < UINT32_MAX && d > 0;
            cfg.ping_interval_ms = (uint32_t)(d * 1000);
            break;
        case 'a':
            cfg.answer_pings = true;
            break;
        case 'l':
            G.ledger_path = optarg;
            break;
        case 'x':
            G.strict = true;
            break;
        case 'q':
            G.quiet = true;
            break;
        case 'E':
            ok = parse_u32(optarg, &echo_port) && echo_port <= 65535;
            want_echo = ok;
            break;
        case 'T':
            cfg.tunnels_off = true;
            break;
        case 'N':
            ok = parse_u32(optarg, &cfg.max_tunnels) && cfg.max_tunnels > 0;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "edge-sim: bad value: %s\n", optarg ? optarg : "");
            return 2;
        }
    }
    if (!cfg.url || !key) {
        usage(stderr);
        return 2;
    }
    cfg.app_key = key;
    uint32_t ip_lo = 0, ip_hi = 0;
    if (ips) {
        char lo[64] = "", hi[64] = "";
        const char *dash = strchr(ips, '-');
        size_t ll = dash ? (size_t)(dash - ips) : strlen(ips);
        if (ll >= sizeof(lo) || (dash && strlen(dash + 1) >= sizeof(hi))) {
            fprintf(stderr, "edge-sim: bad --source-ips\n");
            return 2;
        }
        memcpy(lo, ips, ll);
        snprintf(hi, sizeof(hi), "%s", dash ? dash + 1 : lo);
        struct in_addr a, b;
        if (inet_pton(AF_INET, lo, &a) != 1 || inet_pton(AF_INET, hi, &b) != 1 ||
            ntohl(b.s_addr) < ntohl(a.s_addr)) {
            fprintf(stderr, "edge-sim: bad --source-ips\n");
            return 2;
        }
        ip_lo = ntohl(a.s_addr);
        ip_hi = ntohl(b.s_addr);
    }
    /* Thousands of edges need thousands of descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* A peer that went away must cost a write error (EPIPE), not the
     * process: libuv writes to sockets with write(2). */
    signal(SIGPIPE, SIG_IGN);
    G.loop = uv_default_loop();
    G.rng = uv_hrtime() | 1;
    if (want_echo) {
        int erc = echo_listen(echo_port);
        if (erc != 0) {
            fprintf(stderr, "edge-sim: tunnel echo on 127.0.0.1:%u: %s\n", echo_port,
                    uv_strerror(erc));
            return 1;
        }
    }
    if (G.size) {
        uint8_t *fill = calloc(1, G.size);
        size_t cap = ao_infotable_blob_size("Value", G.size);
        G.params = fill ? malloc(cap) : NULL;
        if (!G.params)
            return 1;
        G.params_len = ao_infotable_blob(G.params, cap, "Value", fill, G.size);
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
    G.edges = calloc(G.nedges, sizeof(*G.edges));
    if (!G.edges)
        return 1;
    for (uint32_t i = 0; i < G.nedges; i++) {
        char src[INET_ADDRSTRLEN];
        if (ips) {
            struct in_addr a = {htonl(ip_lo + i % (ip_hi - ip_lo + 1))};
            inet_ntop(AF_INET, &a, src, sizeof(src));
            cfg.source_ip = src;
        }
        G.edges[i].c = emx_edge_client_new(G.loop, &cfg);
        G.edges[i].things = calloc(G.nthings, sizeof(char *));
        if (!G.edges[i].c || !G.edges[i].things) {
            fprintf(stderr, "edge-sim: cannot create edge %u (bad --url?)\n", i);
            return 2;
        }
        for (uint32_t k = 0; k < G.nthings; k++) {
            char name[48];
            snprintf(name, sizeof(name), "sim-edge-%u-thing-%u", i, k);
            G.edges[i].things[k] = strdup(name);
        }
        emx_edge_client_bind(G.edges[i].c, (const char *const *)G.edges[i].things, G.nthings);
        emx_edge_client_start(G.edges[i].c);
    }
    G.start_ns = G.last_progress_ns = uv_hrtime();
    uv_timer_init(G.loop, &G.tick);
    uv_timer_start(&G.tick, on_tick, 10, 10);
    uv_signal_init(G.loop, &G.sigint);
    uv_signal_start(&G.sigint, on_sigint, SIGINT);
    uv_run(G.loop, UV_RUN_DEFAULT);
    int rc = summary();
    for (uint32_t i = 0; i < G.nedges; i++) {
        emx_edge_client_free(G.edges[i].c);
        for (uint32_t k = 0; k < G.nthings; k++)
            free(G.edges[i].things[k]);
        free(G.edges[i].things);
    }
    uv_run(G.loop, UV_RUN_DEFAULT);
    uv_loop_close(G.loop);
    free(G.edges);
    free(G.params);
    free(G.mp_params);
    free(key);
    ws_thread_cleanup();
    return rc;
}
