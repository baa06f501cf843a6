/* The built emx-discovery-dns-srv.so, loaded with dlopen against the host table
 * of tests/integration/common, its options bound by the core's own binder.
 *
 *   test_dns_srv_plugin fixture   a DNS responder of this test on the same
 *                                 loop: additional records or separate A/AAAA,
 *                                 TC over UDP then TCP, SERVFAIL, REFUSED,
 *                                 no answer, malformed answers, NXDOMAIN and
 *                                 NODATA, several names, backoff, TTL timing,
 *                                 stop mid-query, option errors.
 *   test_dns_srv_plugin knot      a knotd started by the test (its own config,
 *                                 rundir and control socket in a temp dir, on
 *                                 127.0.0.1:<free port>), records changed with
 *                                 knotc zone-begin/zone-set/zone-unset/
 *                                 zone-commit while the plugin watches.
 *
 * Every wait is bounded by a uv timer. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
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

#include "config.h"
#include "dnspkt.h"
#include "edgemux/discovery.h"
#include "test_host.h"

extern char **environ;

#define WAIT_MS 6000
#define LOG_MAX 4096
#define LOG_LEN 400
#define SET_MAX 128
#define ZONE    "example.test"

/* ---- the DNS fixture ---- */

enum dns_mode { M_NORMAL, M_SERVFAIL, M_REFUSED, M_DROP, M_MALFORMED, M_TC_UDP };

struct zrec {
    char name[96];
    uint16_t type;
    uint32_t ttl;
    uint16_t prio, weight, port;
    char data[96]; /* SRV target, address or CNAME target */
};

struct tcp_conn {
    uv_tcp_t h;
    struct dns_fixture *dns;
    uint8_t buf[65536 + 2];
    size_t len;
    struct tcp_conn *next;
};

struct dns_fixture {
    uv_udp_t udp;
    uv_tcp_t tcp;
    uint16_t port;
    bool up;
    struct zrec recs[200];
    int nrecs;
    bool additional;    /* targets' A/AAAA in the additional section */
    enum dns_mode mode; /* for every question */
    char fail_name[96]; /* ... or only for this name */
    enum dns_mode fail_mode;
    int udp_queries, tcp_queries, srv_queries, addr_queries;
    struct tcp_conn *conns;
    struct pkt out;
};

struct fx {
    struct th_host th;
    struct emx_node *yaml;
    struct dns_fixture dns;
};

/* ---- knotd, shared by the knot group ---- */

struct knot {
    char dir[PATH_MAX];
    char conf[PATH_MAX + 32];
    char sock[PATH_MAX + 32];
    uint16_t port;
    pid_t pid;
};

static struct knot K;

/* ---- loop ---- */

static bool udp_queries_over(struct th_host *th, long n)
{
    return ((struct fx *)th->user)->dns.udp_queries > n;
}

static void wait_count(struct fx *fx, size_t n, uint64_t ms)
{
    if (!th_wait_until(&fx->th, th_count_is, (long)n, ms))
        fail_msg("the set did not reach %zu instances in %llu ms (it has %zu; failures %d: %s)", n,
                 (unsigned long long)ms, fx->th.rec.count, fx->th.rec.failures, fx->th.rec.reason);
}

static const struct th_instance *expect(struct fx *fx, const char *id, const char *host,
                                        uint16_t port, uint32_t priority, uint32_t weight)
{
    const struct th_instance *in = th_find(&fx->th, id);
    if (!in)
        fail_msg("no instance %s in the set of %zu", id, fx->th.rec.count);
    assert_string_equal(in->host, host);
    assert_int_equal(in->port, port);
    assert_int_equal(in->priority, priority);
    assert_int_equal(in->weight, weight);
    return in;
}

static uint64_t now_ms(struct fx *fx)
{
    uv_update_time(&fx->th.loop);
    return uv_now(&fx->th.loop);
}

/* ---- the DNS fixture: a responder on this loop ---- */

static void z_clear(struct dns_fixture *d)
{
    d->nrecs = 0;
}

static void z_srv(struct dns_fixture *d, const char *name, uint32_t ttl, uint16_t prio,
                  uint16_t weight, uint16_t port, const char *target)
{
    assert_true(d->nrecs < (int)(sizeof(d->recs) / sizeof(d->recs[0])));
    struct zrec *r = &d->recs[d->nrecs++];
    memset(r, 0, sizeof(*r));
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->type = 33;
    r->ttl = ttl;
    r->prio = prio;
    r->weight = weight;
    r->port = port;
    snprintf(r->data, sizeof(r->data), "%s", target);
}

static void z_addr(struct dns_fixture *d, const char *name, uint32_t ttl, const char *addr)
{
    assert_true(d->nrecs < (int)(sizeof(d->recs) / sizeof(d->recs[0])));
    struct zrec *r = &d->recs[d->nrecs++];
    memset(r, 0, sizeof(*r));
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->type = strchr(addr, ':') ? 28 : 1;
    r->ttl = ttl;
    snprintf(r->data, sizeof(r->data), "%s", addr);
}

static void z_txt(struct dns_fixture *d, const char *name)
{
    struct zrec *r = &d->recs[d->nrecs++];
    memset(r, 0, sizeof(*r));
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->type = 16;
    r->ttl = 1;
}

/* The question of a query: its name (dotted, no trailing dot), type, and
 * where the question ends. -1 for anything this fixture does not expect. */
static int read_query(const uint8_t *q, size_t len, char *name, size_t namelen, uint16_t *qtype,
                      size_t *qend)
{
    if (len < 17 || (q[2] & 0x80))
        return -1;
    size_t at = 12, o = 0;
    while (at < len && q[at]) {
        size_t n = q[at];
        if (n > 63 || at + 1 + n >= len || o + n + 2 > namelen)
            return -1;
        if (o)
            name[o++] = '.';
        for (size_t i = 0; i < n; i++) {
            char c = (char)q[at + 1 + i];
            name[o++] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
        }
        at += 1 + n;
    }
    name[o] = '\0';
    if (at + 5 > len)
        return -1;
    *qtype = (uint16_t)((q[at + 1] << 8) | q[at + 2]);
    *qend = at + 5;
    return 0;
}

static bool z_exists(const struct dns_fixture *d, const char *name)
{
    for (int i = 0; i < d->nrecs; i++)
        if (strcmp(d->recs[i].name, name) == 0)
            return true;
    return false;
}

/* Builds the answer to one query in d->out; false: send nothing. */
static bool respond(struct dns_fixture *d, const uint8_t *q, size_t len, bool tcp)
{
    char qname[256];
    uint16_t qtype;
    size_t qend;
    if (read_query(q, len, qname, sizeof(qname), &qtype, &qend) != 0)
        return false;
    if (tcp)
        d->tcp_queries++;
    else
        d->udp_queries++;
    if (qtype == 33)
        d->srv_queries++;
    else
        d->addr_queries++;
    uint16_t id = (uint16_t)((q[0] << 8) | q[1]);
    enum dns_mode mode =
        d->fail_name[0] ? (strcmp(qname, d->fail_name) == 0 ? d->fail_mode : M_NORMAL) : d->mode;
    struct pkt *p = &d->out;

    switch (mode) {
    case M_DROP:
        return false;
    case M_SERVFAIL:
    case M_REFUSED:
        pkt_begin(p, id, mode == M_SERVFAIL ? 2 : 5);
        pkt_question(p, qname, qtype);
        pkt_finish(p);
        return true;
    case M_MALFORMED:
        /* A good header and question, then an answer record cut short. */
        pkt_begin(p, id, 0);
        pkt_question(p, qname, qtype);
        p->an = 1;
        pkt_ptr(p, 12);
        pkt_u16(p, qtype);
        pkt_u16(p, 1);
        pkt_finish(p);
        return true;
    case M_TC_UDP:
        if (!tcp) {
            pkt_begin(p, id, 0x0200);
            pkt_question(p, qname, qtype);
            pkt_finish(p);
            return true;
        }
        break;
    case M_NORMAL:
        break;
    }

    bool found = false;
    for (int i = 0; i < d->nrecs; i++)
        found = found || (strcmp(d->recs[i].name, qname) == 0 && d->recs[i].type == qtype);
    pkt_begin(p, id, found || z_exists(d, qname) ? 0 : 3);
    pkt_question(p, qname, qtype);
    for (int i = 0; i < d->nrecs; i++) {
        const struct zrec *r = &d->recs[i];
        if (strcmp(r->name, qname) != 0 || r->type != qtype)
            continue;
        if (r->type == 33)
            pkt_srv(p, PKT_AN, r->name, r->ttl, r->prio, r->weight, r->port, r->data);
        else
            pkt_addr(p, PKT_AN, r->name, r->ttl, r->data);
    }
    if (qtype == 33 && d->additional) {
        for (int i = 0; i < d->nrecs; i++) {
            const struct zrec *r = &d->recs[i];
            if (r->type != 33 || strcmp(r->name, qname) != 0)
                continue;
            for (int j = 0; j < d->nrecs; j++)
                if ((d->recs[j].type == 1 || d->recs[j].type == 28) &&
                    strcmp(d->recs[j].name, r->data) == 0)
                    pkt_addr(p, PKT_AR, d->recs[j].name, d->recs[j].ttl, d->recs[j].data);
        }
    }
    if (!found)
        pkt_soa(p, ZONE, 1, 1);
    pkt_finish(p);
    /* What does not fit a plain UDP answer is truncated, as servers do. */
    if (!tcp && p->len > 512) {
        pkt_begin(p, id, 0x0200);
        pkt_question(p, qname, qtype);
        pkt_finish(p);
    }
    return !p->overflow;
}

static void udp_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf)
{
    static char slab[65536];
    (void)h;
    (void)size;
    buf->base = slab;
    buf->len = sizeof(slab);
}

static void udp_recv(uv_udp_t *u, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *addr,
                     unsigned flags)
{
    struct dns_fixture *d = u->data;
    (void)flags;
    if (nread <= 0 || !addr)
        return;
    if (!respond(d, (const uint8_t *)buf->base, (size_t)nread, false))
        return;
    uv_buf_t out = uv_buf_init((char *)d->out.b, (unsigned)d->out.len);
    uv_udp_try_send(u, &out, 1, addr);
}

static void conn_closed(uv_handle_t *h)
{
    free(h->data);
}

static void conn_close(struct tcp_conn *c)
{
    struct tcp_conn **pp = &c->dns->conns;
    while (*pp && *pp != c)
        pp = &(*pp)->next;
    if (*pp)
        *pp = c->next;
    uv_close((uv_handle_t *)&c->h, conn_closed);
}

static void tcp_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf)
{
    struct tcp_conn *c = h->data;
    (void)size;
    buf->base = (char *)c->buf + c->len;
    buf->len = sizeof(c->buf) - c->len;
}

static void write_done(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

static void tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct tcp_conn *c = s->data;
    (void)buf;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)nread;
    while (c->len >= 2) {
        size_t n = ((size_t)c->buf[0] << 8) | c->buf[1];
        if (c->len < 2 + n)
            break;
        if (respond(c->dns, c->buf + 2, n, true)) {
            size_t m = c->dns->out.len;
            uv_write_t *w = malloc(sizeof(*w) + 2 + m);
            assert_non_null(w);
            uint8_t *b = (uint8_t *)(w + 1);
            b[0] = (uint8_t)(m >> 8);
            b[1] = (uint8_t)m;
            memcpy(b + 2, c->dns->out.b, m);
            uv_buf_t out = uv_buf_init((char *)b, (unsigned)(m + 2));
            uv_write(w, s, &out, 1, write_done);
        }
        memmove(c->buf, c->buf + 2 + n, c->len - 2 - n);
        c->len -= 2 + n;
    }
}

static void tcp_accept(uv_stream_t *server, int status)
{
    struct dns_fixture *d = server->data;
    if (status < 0)
        return;
    struct tcp_conn *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    c->dns = d;
    uv_tcp_init(server->loop, &c->h);
    c->h.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->h) != 0) {
        uv_close((uv_handle_t *)&c->h, conn_closed);
        return;
    }
    c->next = d->conns;
    d->conns = c;
    uv_read_start((uv_stream_t *)&c->h, tcp_alloc, tcp_read);
}

/* UDP and TCP on one free port of 127.0.0.1. */
static void dns_start(struct fx *fx)
{
    struct dns_fixture *d = &fx->dns;
    for (int attempt = 0; attempt < 20; attempt++) {
        struct sockaddr_in sa;
        struct sockaddr_storage got;
        int glen = sizeof(got);
        uv_ip4_addr("127.0.0.1", 0, &sa);
        assert_int_equal(uv_udp_init(&fx->th.loop, &d->udp), 0);
        d->udp.data = d;
        assert_int_equal(uv_udp_bind(&d->udp, (struct sockaddr *)&sa, 0), 0);
        assert_int_equal(uv_udp_getsockname(&d->udp, (struct sockaddr *)&got, &glen), 0);
        d->port = ntohs(((struct sockaddr_in *)&got)->sin_port);
        uv_ip4_addr("127.0.0.1", d->port, &sa);
        assert_int_equal(uv_tcp_init(&fx->th.loop, &d->tcp), 0);
        d->tcp.data = d;
        if (uv_tcp_bind(&d->tcp, (struct sockaddr *)&sa, 0) == 0 &&
            uv_listen((uv_stream_t *)&d->tcp, 16, tcp_accept) == 0) {
            assert_int_equal(uv_udp_recv_start(&d->udp, udp_alloc, udp_recv), 0);
            d->up = true;
            return;
        }
        uv_close((uv_handle_t *)&d->udp, NULL);
        uv_close((uv_handle_t *)&d->tcp, NULL);
        uv_run(&fx->th.loop, UV_RUN_NOWAIT);
    }
    fail_msg("no free port for the DNS fixture");
}

static void dns_stop(struct fx *fx)
{
    struct dns_fixture *d = &fx->dns;
    if (!d->up)
        return;
    d->up = false;
    while (d->conns)
        conn_close(d->conns);
    uv_close((uv_handle_t *)&d->udp, NULL);
    uv_close((uv_handle_t *)&d->tcp, NULL);
}

/* ---- knotd ---- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_true(fputs(text, f) >= 0);
    assert_int_equal(fclose(f), 0);
}

/* Runs argv with its output appended to <dir>/commands.log; returns the
 * exit status (-1 if it did not exit). */
static int run(const char *const *argv)
{
    char log[PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/commands.log", K.dir);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0)
        return -1;
    int st;
    if (waitpid(pid, &st, 0) != pid)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int knotc(const char *a, const char *b, const char *c)
{
    const char *argv[8] = {EMX_KNOTC, "-s", K.sock, "-t", "5", a, b, c};
    int n = c ? 8 : b ? 7 : 6;
    const char *args[9];
    for (int i = 0; i < n; i++)
        args[i] = argv[i];
    args[n] = NULL;
    return run(args);
}

/* One transaction on the zone: each op is "set OWNER TTL TYPE RDATA..." or
 * "unset OWNER [TYPE [RDATA...]]", owners relative to the zone. */
static void knot_txn(const char *const *ops, size_t n)
{
    assert_int_equal(knotc("zone-begin", ZONE, NULL), 0);
    for (size_t i = 0; i < n; i++) {
        char copy[256];
        snprintf(copy, sizeof(copy), "%s", ops[i]);
        const char *argv[24] = {EMX_KNOTC, "-s", K.sock, "-t", "5"};
        int k = 5;
        char *save = NULL;
        char *w = strtok_r(copy, " ", &save);
        assert_non_null(w);
        argv[k++] = strcmp(w, "set") == 0 ? "zone-set" : "zone-unset";
        argv[k++] = ZONE;
        while ((w = strtok_r(NULL, " ", &save)) && k < 23)
            argv[k++] = w;
        argv[k] = NULL;
        if (run(argv) != 0) {
            knotc("zone-abort", ZONE, NULL);
            fail_msg("knotc %s failed (see %s/commands.log)", ops[i], K.dir);
        }
    }
    assert_int_equal(knotc("zone-commit", ZONE, NULL), 0);
}

static uint16_t free_port(void)
{
    /* A port free for UDP and TCP right now; knotd binds it next. */
    for (int attempt = 0; attempt < 50; attempt++) {
        int u = socket(AF_INET, SOCK_DGRAM, 0), t = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
        sa.sin_addr.s_addr = htonl(0x7F000001);
        socklen_t len = sizeof(sa);
        uint16_t port = 0;
        if (u >= 0 && t >= 0 && bind(u, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
            getsockname(u, (struct sockaddr *)&sa, &len) == 0 &&
            bind(t, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            port = ntohs(sa.sin_port);
        if (u >= 0)
            close(u);
        if (t >= 0)
            close(t);
        if (port)
            return port;
    }
    return 0;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The zone every knot test starts from; each test uses names of its own. */
static void knot_zone_file(const char *path)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "$ORIGIN " ZONE ".\n$TTL 1\n"
               "@ 1 SOA ns admin 1 60 60 600 1\n"
               "@ 1 NS ns\n"
               "ns 1 A 127.0.0.1\n"
               "p1 1 A 127.0.0.11\n"
               "p2 1 A 127.0.0.12\n"
               "p3 1 A 127.0.0.13\n"
               "p6 1 AAAA fd00::16\n"
               "_initial._tcp 1 SRV 0 10 8443 p1\n"
               "_initial._tcp 1 SRV 0 20 8444 p2\n"
               "_initial._tcp 1 SRV 1 0 8445 p6\n"
               "_nodata._tcp 1 TXT \"no SRV here\"\n");
    /* 60 SRV records with 60 addresses: far more than 512 bytes */
    for (int i = 1; i <= 60; i++)
        fprintf(f, "_big._tcp 1 SRV 0 1 %d h%d\nh%d 1 A 127.0.1.%d\n", 9000 + i, i, i, i);
    assert_int_equal(fclose(f), 0);
}

static int knot_group_setup(void **state)
{
    (void)state;
    /* The control socket's path must fit sun_path (108 bytes): a long
     * TMPDIR gives way to /tmp. */
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !tmp[0] || strlen(tmp) > 60)
        tmp = "/tmp";
    snprintf(K.dir, sizeof(K.dir), "%s/emx-knot-XXXXXX", tmp);
    assert_non_null(mkdtemp(K.dir));
    snprintf(K.conf, sizeof(K.conf), "%s/knot.conf", K.dir);
    snprintf(K.sock, sizeof(K.sock), "%s/knot.sock", K.dir);
    char path[PATH_MAX + 64];
    static char text[8 * PATH_MAX];
    snprintf(path, sizeof(path), "%s/db", K.dir);
    assert_int_equal(mkdir(path, 0700), 0);
    snprintf(path, sizeof(path), "%s/" ZONE ".zone", K.dir);
    knot_zone_file(path);
    if (access(EMX_KNOTD, X_OK) != 0 || access(EMX_KNOTC, X_OK) != 0) {
        fprintf(stderr, "knotd or knotc missing (%s, %s): run scripts/deps.sh\n", EMX_KNOTD,
                EMX_KNOTC);
        return -1;
    }

    for (int attempt = 0; attempt < 5; attempt++) {
        K.port = free_port();
        assert_true(K.port != 0);
        snprintf(text, sizeof(text),
                 "server:\n"
                 "    rundir: \"%s\"\n"
                 "    listen: 127.0.0.1@%u\n"
                 "database:\n"
                 "    storage: \"%s/db\"\n"
                 "control:\n"
                 "    listen: \"%s\"\n"
                 "log:\n"
                 "  - target: stderr\n"
                 "    any: info\n"
                 "template:\n"
                 "  - id: default\n"
                 "    storage: \"%s\"\n"
                 "    zonefile-sync: -1\n"
                 "zone:\n"
                 "  - domain: " ZONE "\n"
                 "    file: \"" ZONE ".zone\"\n",
                 K.dir, K.port, K.dir, K.sock, K.dir);
        write_file(K.conf, text);

        char log[PATH_MAX + 32];
        snprintf(log, sizeof(log), "%s/knotd.log", K.dir);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        posix_spawn_file_actions_adddup2(&fa, 1, 2);
        const char *argv[] = {EMX_KNOTD, "-c", K.conf, NULL};
        assert_int_equal(posix_spawn(&K.pid, EMX_KNOTD, &fa, NULL, (char *const *)argv, environ),
                         0);
        posix_spawn_file_actions_destroy(&fa);

        /* Running once its control socket answers; a busy port ends it. */
        for (int i = 0; i < 100; i++) {
            int st;
            if (waitpid(K.pid, &st, WNOHANG) == K.pid) {
                K.pid = 0;
                break;
            }
            if (knotc("status", NULL, NULL) == 0)
                return 0;
            sleep_ms(50);
        }
        if (K.pid) {
            kill(K.pid, SIGKILL);
            waitpid(K.pid, NULL, 0);
            K.pid = 0;
        }
    }
    fprintf(stderr, "knotd did not start: see %s/knotd.log\n", K.dir);
    return -1;
}

static int knot_group_teardown(void **state)
{
    (void)state;
    if (K.pid) {
        kill(K.pid, SIGTERM);
        int st;
        for (int i = 0; i < 100 && waitpid(K.pid, &st, WNOHANG) != K.pid; i++)
            sleep_ms(50);
        if (kill(K.pid, 0) == 0) {
            kill(K.pid, SIGKILL);
            waitpid(K.pid, &st, 0);
        }
        K.pid = 0;
    }
    if (!getenv("EMX_TEST_KEEP"))
        nftw(K.dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* ---- plugin ---- */

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    const struct th_config conf = {
        .plugin = EMX_DNS_SRV_PLUGIN,
        .name = "dns-srv",
        .set_max = SET_MAX,
        .log_max = LOG_MAX,
        .log_len = LOG_LEN,
        .line_len = LOG_LEN - 4,
        .parse_size = emx_parse_size,
        .parse_duration = emx_parse_duration,
    };
    th_open(&fx->th, &conf, fx);
    fx->dns.additional = true;
    *state = fx;
    return 0;
}

/* Binds the plugin's options from YAML (the discovery section's keys) with
 * the core's own binder; returns the number of errors. */
__attribute__((format(printf, 2, 3))) static int configure(struct fx *fx, const char *fmt, ...)
{
    char text[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    struct emx_errors errs = {0};
    if (fx->yaml)
        emx_node_free(fx->yaml);
    fx->yaml = NULL;
    free(fx->th.cfg);
    fx->th.cfg = calloc(1, fx->th.d->config_size);
    assert_non_null(fx->th.cfg);
    int rc = emx_yaml_parse("discovery.yaml", text, strlen(text), &fx->yaml, &errs);
    assert_int_equal(rc, 0);
    int n = emx_options_bind_section(fx->th.d->options, fx->yaml, NULL, "discovery", NULL,
                                     fx->th.cfg, &errs);
    for (size_t i = 0; i < errs.count; i++)
        fprintf(stderr, "config: %s\n", errs.msgs[i]);
    emx_errors_free(&errs);
    return n;
}

/* Options for the fixture: quick timeouts and retries; `extra` lines
 * replace the defaults of the keys they set. */
static void configure_fixture(struct fx *fx, const char *names, const char *extra)
{
    static const char *const defaults[] = {"timeout: 200ms\n", "tries: 1\n", "min_ttl: 100ms\n",
                                           "retry_min: 100ms\n", "retry_max: 400ms\n"};
    char text[2048];
    int n = snprintf(text, sizeof(text), "names: %s\n", names);
    if (!strstr(extra ? extra : "", "resolvers:"))
        n += snprintf(text + n, sizeof(text) - (size_t)n, "resolvers: [\"127.0.0.1:%u\"]\n",
                      fx->dns.port);
    for (size_t i = 0; i < sizeof(defaults) / sizeof(defaults[0]); i++) {
        char key[32];
        snprintf(key, sizeof(key), "%.*s", (int)(strchr(defaults[i], ':') - defaults[i] + 1),
                 defaults[i]);
        if (!extra || !strstr(extra, key))
            n += snprintf(text + n, sizeof(text) - (size_t)n, "%s", defaults[i]);
    }
    snprintf(text + n, sizeof(text) - (size_t)n, "%s", extra ? extra : "");
    assert_int_equal(configure(fx, "%s", text), 0);
}

/* stop, let libuv close every handle, destroy: the loop must then close. */
static void finish(struct fx *fx)
{
    th_stop(&fx->th, true);
    dns_stop(fx);
    th_await_idle(&fx->th, WAIT_MS);
    th_close_loop(&fx->th);
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    if (!fx->th.rec.stopped)
        finish(fx);
    if (fx->yaml)
        emx_node_free(fx->yaml);
    th_close(&fx->th);
    free(fx);
    return 0;
}

static void fixture_two_records(struct fx *fx)
{
    z_clear(&fx->dns);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 1, 0, 10, 8443, "p1." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 1, 0, 0, 8444, "p2." ZONE);
    z_addr(&fx->dns, "p1." ZONE, 1, "10.0.0.1");
    z_addr(&fx->dns, "p2." ZONE, 1, "10.0.0.2");
}

/* =============================== fixture =============================== */

/* The set from one answer with additional records: every field. */
static void test_initial_set_additional(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    configure_fixture(fx, "_tw._tcp.example.test.", "tls: true\n");
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    const struct th_instance *a = expect(fx, "p1.example.test:8443", "10.0.0.1", 8443, 0, 10);
    assert_true(a->tls);
    assert_string_equal(a->metadata, "srv _tw._tcp.example.test target p1.example.test");
    /* weight 0 is reported as 0 */
    expect(fx, "p2.example.test:8444", "10.0.0.2", 8444, 0, 0);
    /* only the SRV question: the addresses came with it */
    assert_int_equal(fx->dns.addr_queries, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    /* the same answer again is no new update */
    int updates = fx->th.rec.updates;
    int queries = fx->dns.srv_queries;
    assert_true(th_wait_until(&fx->th, udp_queries_over, queries + 1, 3000));
    assert_int_equal(fx->th.rec.updates, updates);
    finish(fx);
}

/* No additional section: the targets are asked for A and AAAA on their own;
 * an IPv6-only target is reached over IPv6; family: ipv6 picks AAAA. */
static void test_targets_resolved_separately(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fx->dns.additional = false;
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 0, 1, 8443, "p1." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 0, 1, 8444, "p1." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 1, 1, 8443, "v6only." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 1, 1, 8443, "noaddr." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 2, 1, 8443, ".");
    z_addr(&fx->dns, "p1." ZONE, 1, "10.0.0.1");
    z_addr(&fx->dns, "p1." ZONE, 30, "fd00::1");
    z_addr(&fx->dns, "v6only." ZONE, 30, "fd00::6");
    z_txt(&fx->dns, "noaddr." ZONE);
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);
    expect(fx, "p1.example.test:8443", "10.0.0.1", 8443, 0, 1);
    expect(fx, "p1.example.test:8444", "10.0.0.1", 8444, 0, 1);
    expect(fx, "v6only.example.test:8443", "fd00::6", 8443, 1, 1);
    /* p1 asked once for A and once for AAAA, not once per record */
    assert_int_equal(fx->dns.addr_queries, 3 * 2);
    assert_true(th_log_count(&fx->th, "targets without an address left out: noaddr.example.test") ==
                1);
    /* the A record's TTL (1 s) sets the next query, not the SRV's 30 s */
    assert_true(th_log_count(&fx->th, "next query in 1000 ms (ttl 1 s)") >= 1);
    finish(fx);
}

static void test_family_ipv6(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fx->dns.additional = false;
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 0, 1, 8443, "p1." ZONE);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 30, 0, 1, 8443, "v4only." ZONE);
    z_addr(&fx->dns, "p1." ZONE, 30, "10.0.0.1");
    z_addr(&fx->dns, "p1." ZONE, 30, "fd00::1");
    z_addr(&fx->dns, "v4only." ZONE, 30, "10.0.0.4");
    configure_fixture(fx, "_tw._tcp.example.test", "family: ipv6\n");
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 1);
    expect(fx, "p1.example.test:8443", "fd00::1", 8443, 0, 1);
    /* only AAAA questions */
    assert_int_equal(fx->dns.addr_queries, 2);
    finish(fx);
}

/* A truncated UDP answer is asked again over TCP and gives the whole set. */
static void test_truncated_udp_retried_over_tcp(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    fx->dns.mode = M_TC_UDP;
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    assert_true(fx->dns.udp_queries >= 1);
    assert_true(fx->dns.tcp_queries >= 1);
    finish(fx);
}

/* Sixty records with their addresses do not fit 512 bytes: the fixture
 * truncates as servers do, and the TCP answer carries all of them. */
static void test_many_records_over_tcp(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    char target[64];
    for (int i = 1; i <= 60; i++) {
        snprintf(target, sizeof(target), "h%d." ZONE, i);
        z_srv(&fx->dns, "_big._tcp." ZONE, 5, 0, 1, (uint16_t)(9000 + i), target);
    }
    for (int i = 1; i <= 60; i++) {
        char addr[32];
        snprintf(target, sizeof(target), "h%d." ZONE, i);
        snprintf(addr, sizeof(addr), "127.0.1.%d", i);
        z_addr(&fx->dns, target, 5, addr);
    }
    configure_fixture(fx, "_big._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 60);
    expect(fx, "h60.example.test:9060", "127.0.1.60", 9060, 0, 1);
    assert_true(fx->dns.tcp_queries >= 1);
    assert_int_equal(fx->dns.addr_queries, 0);
    finish(fx);
}

/* After a good set, each kind of failure is reported with its reason and
 * changes nothing; the answer coming back is reported again. */
static void failure_keeps_set(struct fx *fx, enum dns_mode mode, const char *reason_part)
{
    int updates = fx->th.rec.updates, failures = fx->th.rec.failures;
    fx->dns.mode = mode;
    th_wait_failure(&fx->th, failures, WAIT_MS);
    if (!strstr(fx->th.rec.reason, reason_part))
        fail_msg("reason '%s' lacks '%s'", fx->th.rec.reason, reason_part);
    assert_non_null(strstr(fx->th.rec.reason, "_tw._tcp.example.test"));
    th_run_for(&fx->th, 500); /* retries happen meanwhile */
    assert_int_equal(fx->th.rec.updates, updates);
    assert_int_equal(fx->th.rec.count, 2);
    /* the same failure again is not reported again */
    assert_int_equal(fx->th.rec.failures, failures + 1);
    fx->dns.mode = M_NORMAL;
    th_wait_update(&fx->th, updates, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    assert_int_equal(fx->th.rec.failures, failures + 1);
}

static void test_failures_keep_last_good_set(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    failure_keeps_set(fx, M_SERVFAIL, "SERVFAIL");
    failure_keeps_set(fx, M_REFUSED, "REFUSED");
    failure_keeps_set(fx, M_DROP, "timed out");
    failure_keeps_set(fx, M_MALFORMED, "malformed answer");
    assert_true(th_log_count(&fx->th, "answers again") >= 4);
    finish(fx);
}

/* Nobody listens on the resolver's port: a network error, reported as a
 * failure; no set at all. */
static void test_network_error(void **state)
{
    struct fx *fx = *state;
    int n = configure(fx,
                      "names: [_tw._tcp.example.test]\n"
                      "resolvers: [\"127.0.0.1:%u\"]\n"
                      "timeout: 200ms\ntries: 1\nretry_min: 100ms\nretry_max: 200ms\n",
                      free_port());
    assert_int_equal(n, 0);
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.updates, 0);
    assert_non_null(strstr(fx->th.rec.reason, "_tw._tcp.example.test: SRV query: "));
    finish(fx);
}

/* Resolvers are asked in order: one nobody listens on, then the fixture.
 * When every one fails, the reason names each. */
static void test_resolver_failover(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    char extra[256];
    unsigned dead = free_port();
    snprintf(extra, sizeof(extra), "resolvers: [\"127.0.0.1:%u\", \"127.0.0.1:%u\"]\n", dead,
             fx->dns.port);
    configure_fixture(fx, "_tw._tcp.example.test", extra);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    assert_int_equal(fx->th.rec.failures, 0);
    fx->dns.mode = M_SERVFAIL;
    th_wait_failure(&fx->th, 0, WAIT_MS);
    char want[128];
    snprintf(want, sizeof(want),
             "SRV query: 127.0.0.1:%u connection refused; 127.0.0.1:%u SERVFAIL", dead,
             fx->dns.port);
    if (!strstr(fx->th.rec.reason, want))
        fail_msg("reason '%s' lacks '%s'", fx->th.rec.reason, want);
    assert_int_equal(fx->th.rec.count, 2);
    finish(fx);
}

/* Failures at start give no set; the first answer gives one. */
static void test_failure_at_start(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    fx->dns.mode = M_SERVFAIL;
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    th_run_for(&fx->th, 300);
    assert_int_equal(fx->th.rec.updates, 0);
    fx->dns.mode = M_NORMAL;
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);
    finish(fx);
}

/* NXDOMAIN and NODATA are answers: an empty set is reported. */
static void test_empty_answers(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 2);

    /* NODATA: the name has a TXT record only */
    z_clear(&fx->dns);
    z_txt(&fx->dns, "_tw._tcp." ZONE);
    int updates = fx->th.rec.updates;
    th_wait_update(&fx->th, updates, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);

    /* back, then NXDOMAIN */
    fixture_two_records(fx);
    wait_count(fx, 2, WAIT_MS);
    z_clear(&fx->dns);
    updates = fx->th.rec.updates;
    th_wait_update(&fx->th, updates, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    /* an empty answer that stays empty is not reported again */
    updates = fx->th.rec.updates;
    th_run_for(&fx->th, 1500);
    assert_int_equal(fx->th.rec.updates, updates);
    finish(fx);
}

/* Several names: the union; one name failing keeps its last good part and
 * reports a failure naming it. */
static void test_several_names(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    z_srv(&fx->dns, "_a._tcp." ZONE, 1, 0, 1, 8001, "p1." ZONE);
    z_srv(&fx->dns, "_b._tcp." ZONE, 1, 1, 1, 8002, "p2." ZONE);
    /* the same target and port under both names: one instance, the
     * preferred record's priority */
    z_srv(&fx->dns, "_b._tcp." ZONE, 1, 0, 7, 8001, "p1." ZONE);
    z_addr(&fx->dns, "p1." ZONE, 1, "10.0.0.1");
    z_addr(&fx->dns, "p2." ZONE, 1, "10.0.0.2");
    snprintf(fx->dns.fail_name, sizeof(fx->dns.fail_name), "_b._tcp." ZONE);
    fx->dns.fail_mode = M_SERVFAIL;
    configure_fixture(fx, "[_a._tcp.example.test, _b._tcp.example.test]", NULL);
    th_start(&fx->th);

    /* the first report waits for both names' first answer */
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.updates, 1);
    assert_int_equal(fx->th.rec.failures, 1);
    assert_non_null(strstr(fx->th.rec.reason, "_b._tcp.example.test: SRV query: SERVFAIL"));
    assert_int_equal(fx->th.rec.count, 1);
    expect(fx, "p1.example.test:8001", "10.0.0.1", 8001, 0, 1);

    /* _b answers: the union */
    fx->dns.fail_name[0] = '\0';
    wait_count(fx, 2, WAIT_MS);
    expect(fx, "p1.example.test:8001", "10.0.0.1", 8001, 0, 7);
    expect(fx, "p2.example.test:8002", "10.0.0.2", 8002, 1, 1);

    /* _b stops answering: its part stays while _a changes */
    snprintf(fx->dns.fail_name, sizeof(fx->dns.fail_name), "_b._tcp." ZONE);
    fx->dns.fail_mode = M_DROP;
    int failures = fx->th.rec.failures;
    th_wait_failure(&fx->th, failures, WAIT_MS);
    assert_non_null(strstr(fx->th.rec.reason, "_b._tcp.example.test: SRV query: timed out"));
    z_srv(&fx->dns, "_a._tcp." ZONE, 1, 0, 1, 8003, "p2." ZONE);
    wait_count(fx, 3, WAIT_MS);
    expect(fx, "p2.example.test:8002", "10.0.0.2", 8002, 1, 1);
    expect(fx, "p2.example.test:8003", "10.0.0.2", 8003, 0, 1);
    finish(fx);
}

/* Consecutive failures are retried after growing delays, up to retry_max. */
static void test_backoff(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fx->dns.mode = M_SERVFAIL;
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    uint64_t t0 = now_ms(fx);
    th_wait_failure(&fx->th, 0, WAIT_MS);
    /* retries at ~100, ~200, ~400, ~400 ms (75..100 % of each) */
    assert_true(th_wait_until(&fx->th, udp_queries_over, 4, 3000));
    uint64_t spent = now_ms(fx) - t0;
    assert_true(spent >= (75 + 150 + 300 + 300) * 1 - 50);
    assert_true(th_log_count(&fx->th, "retry in") >= 4);
    /* no retry waited more than retry_max */
    for (int i = 0; i < fx->th.rec.nlogs; i++) {
        const char *r = strstr(th_log(&fx->th, i), "retry in ");
        if (r)
            assert_true(atoi(r + 9) <= 400);
    }
    assert_int_equal(fx->th.rec.updates, 0);
    finish(fx);
}

/* Refresh timing: TTL 0 asks again at min_ttl, a long TTL at max_ttl. */
static void test_ttl_timing(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 0, 0, 1, 8443, "p1." ZONE);
    z_addr(&fx->dns, "p1." ZONE, 0, "10.0.0.1");
    configure_fixture(fx, "_tw._tcp.example.test", "min_ttl: 200ms\nmax_ttl: 400ms\n");
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    int q0 = fx->dns.srv_queries;
    th_run_for(&fx->th, 1000);
    int q = fx->dns.srv_queries - q0;
    /* every 200 ms: about 5 in a second (fewer on a loaded machine), never a
     * busy loop */
    assert_true(q >= 2 && q <= 6);
    assert_true(th_log_count(&fx->th, "next query in 200 ms (ttl 0 s)") >= 3);

    /* TTL 3600 is clamped to max_ttl */
    z_clear(&fx->dns);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 3600, 0, 1, 8443, "p1." ZONE);
    z_addr(&fx->dns, "p1." ZONE, 3600, "10.0.0.1");
    th_run_for(&fx->th, 300);
    q0 = fx->dns.srv_queries;
    th_run_for(&fx->th, 1300);
    q = fx->dns.srv_queries - q0;
    assert_true(q >= 2 && q <= 4);
    assert_true(th_log_count(&fx->th, "next query in 400 ms (ttl 3600 s)") >= 2);
    finish(fx);
}

/* A record added is seen at the next refresh, a record removed too. */
static void test_changes(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fixture_two_records(fx);
    configure_fixture(fx, "_tw._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 1, 0, 5, 8445, "p1." ZONE);
    uint64_t t0 = now_ms(fx);
    wait_count(fx, 3, 2000);
    assert_true(now_ms(fx) - t0 <= 2000);
    expect(fx, "p1.example.test:8445", "10.0.0.1", 8445, 0, 5);
    assert_true(th_log_count(&fx->th, "added p1.example.test:8445") == 1);
    /* an address change is a change of that id */
    fx->dns.recs[2].data[7] = '9'; /* p1: 10.0.0.1 -> 10.0.0.9 */
    int updates = fx->th.rec.updates;
    th_wait_update(&fx->th, updates, WAIT_MS);
    expect(fx, "p1.example.test:8443", "10.0.0.9", 8443, 0, 10);
    assert_true(th_log_count(&fx->th, "changed p1.example.test:8443, p1.example.test:8445") == 1);
    z_clear(&fx->dns);
    z_srv(&fx->dns, "_tw._tcp." ZONE, 1, 0, 0, 8444, "p2." ZONE);
    z_addr(&fx->dns, "p2." ZONE, 1, "10.0.0.2");
    wait_count(fx, 1, 2000);
    assert_non_null(th_find(&fx->th, "p2.example.test:8444"));
    finish(fx);
}

/* Stopped while a query waits for an answer that never comes: nothing is
 * reported after stop, and every handle closes. */
static void test_stop_mid_query(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fx->dns.mode = M_DROP;
    configure_fixture(fx, "[_tw._tcp.example.test, _x._tcp.example.test]", "timeout: 5s\n");
    th_start(&fx->th);
    assert_true(th_wait_until(&fx->th, udp_queries_over, 1, WAIT_MS));
    finish(fx);
    assert_int_equal(fx->th.rec.updates, 0);
    assert_int_equal(fx->th.rec.failures, 0);
}

/* Stopped while targets' address queries are in flight. */
static void test_stop_mid_address_query(void **state)
{
    struct fx *fx = *state;
    dns_start(fx);
    fx->dns.additional = false;
    fixture_two_records(fx);
    snprintf(fx->dns.fail_name, sizeof(fx->dns.fail_name), "p2." ZONE);
    fx->dns.fail_mode = M_DROP;
    configure_fixture(fx, "_tw._tcp.example.test", "timeout: 5s\n");
    th_start(&fx->th);
    assert_true(th_wait_until(&fx->th, udp_queries_over, 4, WAIT_MS));
    finish(fx);
    assert_int_equal(fx->th.rec.updates, 0);
}

static void test_option_errors(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    static const char *const bad[] = {
        "names: [\"bad name\"]\n",
        "names: [_a._tcp.x, _A._tcp.x.]\n",
        "names: [a..b]\n",
        "names: [_a._tcp.x]\nresolvers: [\"localhost\"]\n",
        "names: [_a._tcp.x]\nresolvers: [\"127.0.0.1:0\"]\n",
        "names: [_a._tcp.x]\nresolvers: [\"127.0.0.1:99999\"]\n",
        "names: [_a._tcp.x]\nresolvers: [\"[::1\"]\n",
        "names: [_a._tcp.x]\nmin_ttl: 10s\nmax_ttl: 5s\n",
        "names: [_a._tcp.x]\nmin_ttl: 0\n",
        "names: [_a._tcp.x]\ntries: 0\n",
        "names: [_a._tcp.x]\ntimeout: 0\n",
        "names: [_a._tcp.x]\nretry_min: 2s\nretry_max: 1s\n",
        "names: [_a._tcp.x]\nfamily: ipv5\n",
        "names: []\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(configure(fx, "%s", bad[i]), 0);
        int rc = fx->th.d->create(&fx->th.host, fx->th.cfg, &inst);
        if (rc != -EINVAL)
            fail_msg("accepted: %s", bad[i]);
        assert_null(inst);
    }
    /* the core refuses these before the plugin sees them */
    assert_true(configure(fx, "resolvers: [\"127.0.0.1\"]\n") > 0); /* names required */
    assert_true(configure(fx, "names: [_a._tcp.x]\ntls: maybe\n") > 0);

    /* good ones: IPv6 resolvers with and without a port */
    assert_int_equal(configure(fx, "names: _a._tcp.x\n"
                                   "resolvers: [\"::1\", \"[::1]:5353\", \"[::1]\", "
                                   "\"127.0.0.1:53\", \"10.1.2.3\"]\n"),
                     0);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), 0);
    fx->th.d->destroy(inst);
    assert_int_equal(fx->th.d->reconfigure(NULL, fx->th.cfg), -ENOTSUP);
}

/* destroy without start frees at once: nothing was given to libuv. */
static void test_destroy_without_start(void **state)
{
    struct fx *fx = *state;
    void *inst = NULL;
    assert_int_equal(configure(fx, "names: [_a._tcp.x]\n"), 0);
    assert_int_equal(fx->th.d->create(&fx->th.host, fx->th.cfg, &inst), 0);
    fx->th.d->destroy(inst);
    assert_false(uv_loop_alive(&fx->th.loop));
}

/* ================================= knot ================================= */

static void configure_knot(struct fx *fx, const char *names, const char *extra)
{
    int n = configure(fx,
                      "names: %s\n"
                      "resolvers: [\"127.0.0.1:%u\"]\n"
                      "timeout: 500ms\n"
                      "tries: 2\n"
                      "%s",
                      names, K.port, extra ? extra : "");
    assert_int_equal(n, 0);
}

/* The zone file's set: additional A and AAAA, two priorities, weight 0. */
static void test_knot_initial_set(void **state)
{
    struct fx *fx = *state;
    configure_knot(fx, "[_initial._tcp.example.test.]", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 3);
    expect(fx, "p1.example.test:8443", "127.0.0.11", 8443, 0, 10);
    expect(fx, "p2.example.test:8444", "127.0.0.12", 8444, 0, 20);
    const struct th_instance *v6 = expect(fx, "p6.example.test:8445", "fd00::16", 8445, 1, 0);
    assert_false(v6->tls);
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

/* Added, weight 0, a second priority, removed: each seen within TTL + 1 s. */
static void test_knot_changes(void **state)
{
    struct fx *fx = *state;
    static const char *const init[] = {"set _chg._tcp 1 SRV 0 10 8443 p1"};
    knot_txn(init, 1);
    configure_knot(fx, "_chg._tcp.example.test", NULL);
    th_start(&fx->th);
    wait_count(fx, 1, WAIT_MS);
    expect(fx, "p1.example.test:8443", "127.0.0.11", 8443, 0, 10);

    /* a record added */
    static const char *const add[] = {"set _chg._tcp 1 SRV 0 0 8444 p2"};
    knot_txn(add, 1);
    uint64_t t0 = now_ms(fx);
    wait_count(fx, 2, 2000);
    assert_true(now_ms(fx) - t0 <= 2000);
    expect(fx, "p2.example.test:8444", "127.0.0.12", 8444, 0, 0);

    /* a backup tier */
    static const char *const tier[] = {"set _chg._tcp 1 SRV 5 3 8445 p3"};
    knot_txn(tier, 1);
    wait_count(fx, 3, 2000);
    expect(fx, "p3.example.test:8445", "127.0.0.13", 8445, 5, 3);

    /* a record removed */
    static const char *const rm[] = {"unset _chg._tcp SRV 0 10 8443 p1"};
    knot_txn(rm, 1);
    t0 = now_ms(fx);
    wait_count(fx, 2, 2000);
    assert_true(now_ms(fx) - t0 <= 2000);
    assert_null(th_find(&fx->th, "p1.example.test:8443"));

    /* a target's address changes: an update of that id */
    static const char *const mv[] = {"unset p3 A", "set p3 1 A 127.0.0.33"};
    knot_txn(mv, 2);
    assert_true(th_wait_until(&fx->th, th_updates_over, fx->th.rec.updates, 2000));
    expect(fx, "p3.example.test:8445", "127.0.0.33", 8445, 5, 3);
    static const char *const back[] = {"unset p3 A", "set p3 1 A 127.0.0.13"};
    knot_txn(back, 2);
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

/* TTL 0 records: asked again every min_ttl (the answer's smallest TTL is the
 * SRV records' 0, the additional A records have 1); a change shows within
 * min_ttl. */
static void test_knot_ttl_zero(void **state)
{
    struct fx *fx = *state;
    static const char *const init[] = {"set _zero._tcp 0 SRV 0 1 8443 p1"};
    knot_txn(init, 1);
    configure_knot(fx, "_zero._tcp.example.test", "min_ttl: 300ms\n");
    th_start(&fx->th);
    wait_count(fx, 1, WAIT_MS);
    static const char *const add[] = {"set _zero._tcp 0 SRV 0 1 8444 p2"};
    knot_txn(add, 1);
    uint64_t t0 = now_ms(fx);
    wait_count(fx, 2, 1000);
    assert_true(now_ms(fx) - t0 <= 1000);
    int before = th_log_count(&fx->th, "next query in 300 ms (ttl 0 s)");
    th_run_for(&fx->th, 1000);
    int n = th_log_count(&fx->th, "next query in 300 ms (ttl 0 s)") - before;
    assert_true(n >= 2 && n <= 4); /* every 300 ms, not a busy loop */
    static const char *const rm[] = {"unset _zero._tcp"};
    knot_txn(rm, 1);
    finish(fx);
}

/* 60 SRV records with 60 addresses: UDP is truncated (TC), TCP carries all. */
static void test_knot_truncation(void **state)
{
    struct fx *fx = *state;
    configure_knot(fx, "_big._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 60);
    char id[64], host[32];
    for (int i = 1; i <= 60; i++) {
        snprintf(id, sizeof(id), "h%d.example.test:%d", i, 9000 + i);
        snprintf(host, sizeof(host), "127.0.1.%d", i);
        expect(fx, id, host, (uint16_t)(9000 + i), 0, 1);
    }
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

/* NXDOMAIN: a name the zone does not have; NODATA: a name with a TXT
 * record only; and a name emptied of its SRV records. Each an empty set. */
static void test_knot_empty(void **state)
{
    struct fx *fx = *state;
    configure_knot(fx, "_nothing._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

static void test_knot_nodata(void **state)
{
    struct fx *fx = *state;
    configure_knot(fx, "_nodata._tcp.example.test", NULL);
    th_start(&fx->th);
    th_wait_update(&fx->th, 0, WAIT_MS);
    assert_int_equal(fx->th.rec.count, 0);
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

static void test_knot_emptied(void **state)
{
    struct fx *fx = *state;
    static const char *const init[] = {"set _gone._tcp 1 SRV 0 1 8443 p1",
                                       "set _gone._tcp 1 TXT keep-the-name"};
    knot_txn(init, 2);
    configure_knot(fx, "_gone._tcp.example.test", NULL);
    th_start(&fx->th);
    wait_count(fx, 1, WAIT_MS);
    /* the SRV records go, the name stays: NODATA */
    static const char *const rm[] = {"unset _gone._tcp SRV"};
    knot_txn(rm, 1);
    wait_count(fx, 0, 2500);
    /* back, then the whole name goes: NXDOMAIN */
    static const char *const add[] = {"set _gone._tcp 1 SRV 0 1 8443 p1"};
    knot_txn(add, 1);
    wait_count(fx, 1, 2500);
    static const char *const all[] = {"unset _gone._tcp"};
    knot_txn(all, 1);
    wait_count(fx, 0, 2500);
    assert_int_equal(fx->th.rec.failures, 0);
    finish(fx);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest fixture[] = {
        cmocka_unit_test_setup_teardown(test_initial_set_additional, setup, teardown),
        cmocka_unit_test_setup_teardown(test_targets_resolved_separately, setup, teardown),
        cmocka_unit_test_setup_teardown(test_family_ipv6, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_udp_retried_over_tcp, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_records_over_tcp, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failures_keep_last_good_set, setup, teardown),
        cmocka_unit_test_setup_teardown(test_network_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resolver_failover, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_at_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_answers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_several_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ttl_timing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_mid_query, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_mid_address_query, setup, teardown),
        cmocka_unit_test_setup_teardown(test_option_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_without_start, setup, teardown),
    };
    const struct CMUnitTest knot[] = {
        cmocka_unit_test_setup_teardown(test_knot_initial_set, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_ttl_zero, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_truncation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_nodata, setup, teardown),
        cmocka_unit_test_setup_teardown(test_knot_emptied, setup, teardown),
    };
    signal(SIGPIPE, SIG_IGN);
    if (argc > 1 && strcmp(argv[1], "knot") == 0)
        return cmocka_run_group_tests_name("dns-srv against knotd", knot, knot_group_setup,
                                           knot_group_teardown);
    if (argc > 1 && strcmp(argv[1], "fixture") == 0)
        return cmocka_run_group_tests_name("dns-srv against the test's DNS fixture", fixture, NULL,
                                           NULL);
    fprintf(stderr, "usage: %s fixture|knot\n", argv[0]);
    return 2;
}
