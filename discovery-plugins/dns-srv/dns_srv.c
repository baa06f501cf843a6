/* emx-discovery-dns-srv: platform instances from DNS SRV records (RFC 2782).
 *
 * c-ares 1.18 runs on the host's libuv loop: its sockets are watched with
 * uv_poll (ARES_OPT_SOCK_STATE_CB) and its timeouts with one uv_timer armed
 * from ares_timeout(); nothing ever waits in select(). Each configured name
 * is asked for its SRV records with ares_query, and the raw answer is read by
 * srv_parse.c (TTLs, the additional section). Targets whose addresses the
 * additional section does not carry are resolved with A/AAAA queries on the
 * same channel. A name is asked again at the smallest TTL it saw, clamped to
 * [min_ttl, max_ttl]; a failure is retried with a doubling, jittered backoff
 * while the name's last good part is kept.
 *
 * The set reported is the union over all names; each instance is one SRV
 * target and port, id "target:port", reached at one address of the target.
 */
#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "edgemux/discovery.h"
#include "instset.h"
#include "srv_parse.h"

#define NAMES_MAX     64
#define RESOLVERS_MAX 16
#define TRIES_MAX     10
#define MIN_TTL_FLOOR 100 /* ms: below this a TTL-0 record would be a busy loop */
#define REASON_MAX    512

struct srv_config {
    struct emx_strlist names;
    struct emx_strlist resolvers;
    bool tls;
    uint64_t min_ttl_ms;
    uint64_t max_ttl_ms;
    uint64_t timeout_ms;
    int64_t tries;
    uint64_t retry_min_ms;
    uint64_t retry_max_ms;
    const char *family;
};

/* One instance found under one name. Strings owned. */
struct item {
    char *id, *host, *metadata;
    uint16_t port;
    uint32_t weight, priority;
};

struct part {
    struct item *items;
    size_t count;
};

struct srv_disc;
struct lookup;

struct name_state {
    struct srv_disc *sd;
    char *name; /* normalised: lower case, no trailing dot */
    uv_timer_t timer;
    struct lookup *lookup; /* the resolution in flight, or NULL */
    struct part good;      /* last good part */
    bool have_good;
    bool first_done; /* one lookup finished, well or not */
    char *failure;   /* the failure last reported, NULL while good */
    unsigned fails;  /* consecutive failures, for the backoff */
    char *skipped;   /* targets without an address last time, for the log */
};

struct addr_job;

/* One question to the resolvers, tried at each in turn: a resolver that
 * fails (timeout, network error, SERVFAIL, REFUSED, a malformed answer) hands
 * the question to the next one. */
struct query {
    struct lookup *lk;
    struct addr_job *job; /* NULL for the SRV question */
    const char *name;     /* borrowed from the name or the job */
    uint16_t qtype;
    size_t first, tried;  /* the resolver asked first; how many were asked */
    char why[REASON_MAX]; /* each resolver's failure so far */
};

/* One target resolved on its own: its additional records were missing. */
struct addr_job {
    char *host;
    struct srv_addr *addrs;
    size_t naddrs;
    uint32_t ttl;
    bool ttl_known;
    struct query q[2]; /* A, AAAA */
};

/* One resolution of one name: the SRV query, then the address queries. It
 * lives until every c-ares callback it is waiting for has come back. */
struct lookup {
    struct srv_disc *sd;
    struct name_state *ns;
    unsigned pending;
    struct query srv;
    struct srv_answer ans;
    struct addr_job *jobs;
    size_t njobs;
    bool failed;
    char reason[REASON_MAX + 64];
};

/* One resolver: a c-ares channel of its own with that one server, so the
 * plugin decides the order and keeps each resolver's failure. */
struct resolver {
    struct srv_disc *sd;
    struct ares_addr_port_node addr;
    char label[INET6_ADDRSTRLEN + 8]; /* "127.0.0.1:53", "[::1]:53" */
    ares_channel channel;
    bool up;
};

struct sock_watch {
    uv_poll_t poll;
    struct resolver *rv;
    ares_socket_t fd;
    struct sock_watch *next;
};

struct srv_disc {
    const struct emx_host *host; /* borrowed until destroy */
    bool tls;
    uint64_t min_ttl_ms, max_ttl_ms, timeout_ms, retry_min_ms, retry_max_ms;
    int tries;
    enum srv_family family;
    struct resolver resolvers[RESOLVERS_MAX];
    size_t nresolvers;

    struct name_state *names;
    size_t nnames;
    size_t first_pending; /* names whose first lookup has not finished */

    bool lib_up;
    uv_timer_t ares_timer;
    bool timer_up;
    struct sock_watch *socks;
    unsigned open_handles;
    bool stopped, destroyed;

    struct emx_instset reported; /* the union last reported */
    bool have_reported;
    bool failed_since_report;
    uint64_t rng;
};

static void name_query(struct name_state *ns);
static void maybe_free(struct srv_disc *sd);

#define LOG(sd_, lvl_, ...) (sd_)->host->log((sd_)->host, (lvl_), __VA_ARGS__)

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

__attribute__((format(printf, 1, 2))) static char *dup_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static uint64_t next_rand(struct srv_disc *sd)
{
    uint64_t x = sd->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    sd->rng = x;
    return x;
}

/* ---- parts and the union ---- */

static void item_free(struct item *it)
{
    free(it->id);
    free(it->host);
    free(it->metadata);
}

static void part_free(struct part *p)
{
    for (size_t i = 0; i < p->count; i++)
        item_free(&p->items[i]);
    free(p->items);
    p->items = NULL;
    p->count = 0;
}

static int item_cmp(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    if (c)
        return c;
    /* The same target and port under two names or twice under one: the
     * preferred record (lower priority, then higher weight) sorts first. */
    if (x->priority != y->priority)
        return x->priority < y->priority ? -1 : 1;
    if (x->weight != y->weight)
        return x->weight > y->weight ? -1 : 1;
    return 0;
}

/* Sorts by id and drops all but the preferred item of each id. */
static void part_normalize(struct part *p)
{
    if (p->count < 2)
        return;
    qsort(p->items, p->count, sizeof(p->items[0]), item_cmp);
    size_t k = 0;
    for (size_t i = 0; i < p->count; i++) {
        if (k && strcmp(p->items[k - 1].id, p->items[i].id) == 0) {
            item_free(&p->items[i]);
            continue;
        }
        p->items[k++] = p->items[i];
    }
    p->count = k;
}

/* Same preference as item_cmp, for the union. */
static int info_prefer(const struct emx_instance_info *x, const struct emx_instance_info *y)
{
    if (x->priority != y->priority)
        return x->priority < y->priority ? -1 : 1;
    if (x->weight != y->weight)
        return x->weight > y->weight ? -1 : 1;
    return 0;
}

/* Every name's part, one instance per id; tls is the plugin's setting. */
static int union_build(struct srv_disc *sd, struct emx_instset *out)
{
    *out = (struct emx_instset){NULL, 0, 0};
    for (size_t i = 0; i < sd->nnames; i++) {
        const struct part *g = &sd->names[i].good;
        for (size_t j = 0; j < g->count; j++) {
            const struct item *it = &g->items[j];
            if (emx_instset_add(out, it->id, it->host, it->port, sd->tls, it->weight, it->priority,
                                it->metadata) < 0) {
                emx_instset_free(out);
                return -ENOMEM;
            }
        }
    }
    emx_instset_normalize(out, info_prefer);
    return 0;
}

static void report(struct srv_disc *sd, bool force)
{
    struct emx_instset u;

    if (sd->stopped)
        return;
    if (union_build(sd, &u)) {
        LOG(sd, EMX_LOG_ERROR, "out of memory building the instance set");
        return;
    }
    if (sd->have_reported && !force && emx_instset_equal(&u, &sd->reported)) {
        emx_instset_free(&u);
        return;
    }
    emx_instset_log_changes(sd->host, NULL, NULL, sd->have_reported ? &sd->reported : NULL, &u);
    emx_instset_report(sd->host, &u);
    emx_instset_free(&sd->reported);
    sd->reported = u;
    sd->have_reported = true;
    sd->failed_since_report = false;
}

/* ---- one name's results ---- */

static void on_name_timer(uv_timer_t *t);

static void name_schedule(struct name_state *ns, uint64_t ms)
{
    if (!ns->sd->stopped)
        uv_timer_start(&ns->timer, on_name_timer, ms, 0);
}

static void first_done(struct name_state *ns)
{
    struct srv_disc *sd = ns->sd;
    if (ns->first_done)
        return;
    ns->first_done = true;
    if (--sd->first_pending > 0)
        return;
    bool any = false;
    for (size_t i = 0; i < sd->nnames; i++)
        any = any || sd->names[i].have_good;
    if (any)
        report(sd, false);
}

/* The name answered: `part` (moved in), the TTL to refresh at, targets left
 * out for want of an address (moved in, or NULL), and what an empty answer
 * was (for the log). */
static void name_good(struct name_state *ns, struct part *part, uint32_t ttl, bool ttl_known,
                      char *skipped, const char *outcome)
{
    struct srv_disc *sd = ns->sd;
    bool recovered = ns->failure != NULL;

    part_free(&ns->good);
    ns->good = *part;
    ns->have_good = true;
    ns->fails = 0;
    if (recovered)
        LOG(sd, EMX_LOG_INFO, "%s: answers again", ns->name);
    free(ns->failure);
    ns->failure = NULL;
    if (skipped && (!ns->skipped || strcmp(skipped, ns->skipped)))
        LOG(sd, EMX_LOG_WARN, "%s: targets without an address left out: %s", ns->name, skipped);
    else if (!skipped && ns->skipped)
        LOG(sd, EMX_LOG_INFO, "%s: every target has an address again", ns->name);
    free(ns->skipped);
    ns->skipped = skipped;

    uint64_t ms = ttl_known ? srv_refresh_ms(ttl, sd->min_ttl_ms, sd->max_ttl_ms) : sd->min_ttl_ms;
    if (ttl_known)
        LOG(sd, EMX_LOG_DEBUG, "%s: %zu instance%s%s, next query in %llu ms (ttl %u s)", ns->name,
            ns->good.count, ns->good.count == 1 ? "" : "s", outcome, (unsigned long long)ms, ttl);
    else
        LOG(sd, EMX_LOG_DEBUG, "%s: %zu instances%s, next query in %llu ms (no ttl)", ns->name,
            ns->good.count, outcome, (unsigned long long)ms);
    name_schedule(ns, ms);

    if (!ns->first_done)
        first_done(ns);
    else
        report(sd, recovered || sd->failed_since_report);
}

static void name_failed(struct name_state *ns, const char *what)
{
    struct srv_disc *sd = ns->sd;
    const struct emx_host *h = sd->host;
    char reason[REASON_MAX + 300];

    ns->fails++;
    uint64_t ms = sd->retry_min_ms;
    for (unsigned i = 1; i < ns->fails && ms < sd->retry_max_ms; i++)
        ms = ms > sd->retry_max_ms / 2 ? sd->retry_max_ms : ms * 2;
    ms = ms - ms / 4 + next_rand(sd) % (ms / 4 + 1); /* jitter: 75..100 % */
    name_schedule(ns, ms);

    snprintf(reason, sizeof(reason), "%s: %s", ns->name, what);
    if (ns->failure && strcmp(ns->failure, reason) == 0) {
        LOG(sd, EMX_LOG_DEBUG, "still failing: %s; retry in %llu ms", reason,
            (unsigned long long)ms);
    } else {
        LOG(sd, EMX_LOG_WARN,
            "%s; keeping this name's last good part (%zu instance%s); retry in "
            "%llu ms",
            reason, ns->good.count, ns->good.count == 1 ? "" : "s", (unsigned long long)ms);
        free(ns->failure);
        ns->failure = dup_str(reason);
        sd->failed_since_report = true;
        h->discovery_failed(h, reason);
    }
    if (!ns->first_done)
        first_done(ns);
}

/* ---- lookups ---- */

static void lookup_free(struct lookup *lk)
{
    for (size_t i = 0; i < lk->njobs; i++) {
        free(lk->jobs[i].host);
        free(lk->jobs[i].addrs);
    }
    free(lk->jobs);
    srv_answer_free(&lk->ans);
    free(lk);
}

__attribute__((format(printf, 2, 3))) static void lookup_fail(struct lookup *lk, const char *fmt,
                                                              ...)
{
    if (lk->failed)
        return; /* the first failure is the one reported */
    lk->failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(lk->reason, sizeof(lk->reason), fmt, ap);
    va_end(ap);
}

static const char *status_text(int status)
{
    switch (status) {
    case ARES_ESERVFAIL:
        return "SERVFAIL";
    case ARES_EREFUSED:
        return "REFUSED";
    case ARES_EFORMERR:
        return "FORMERR";
    case ARES_ENOTIMP:
        return "NOTIMP";
    case ARES_ETIMEOUT:
        return "timed out";
    case ARES_ECONNREFUSED:
        return "connection refused";
    case ARES_EBADRESP:
        return "bad response";
    default:
        return ares_strerror(status);
    }
}

static struct addr_job *job_for(struct lookup *lk, const char *host)
{
    for (size_t i = 0; i < lk->njobs; i++)
        if (strcmp(lk->jobs[i].host, host) == 0)
            return &lk->jobs[i];
    return NULL;
}

/* Builds the name's part from the SRV answer and the address jobs. */
static void lookup_complete(struct lookup *lk)
{
    struct name_state *ns = lk->ns;
    struct srv_disc *sd = lk->sd;
    struct part p = {NULL, 0};
    struct emx_logline skipped = {.len = 0, .full = false};
    uint32_t ttl = lk->ans.ttl;
    bool ttl_known = lk->ans.ttl_known;

    if (lk->ans.count && !(p.items = calloc(lk->ans.count, sizeof(*p.items)))) {
        name_failed(ns, "out of memory");
        return;
    }
    for (size_t i = 0; i < lk->njobs; i++) {
        const struct addr_job *j = &lk->jobs[i];
        if (j->ttl_known && (!ttl_known || j->ttl < ttl)) {
            ttl = j->ttl;
            ttl_known = true;
        }
    }
    for (size_t i = 0; i < lk->ans.count; i++) {
        const struct srv_target *t = &lk->ans.targets[i];
        char addr[INET6_ADDRSTRLEN];
        if (!t->name[0])
            continue; /* target ".": no service there (RFC 2782) */
        if (t->port == 0) {
            emx_logline_add(&skipped, "%s%s (port 0)", skipped.len ? ", " : "", t->name);
            continue;
        }
        int picked = srv_pick_addr(t->addrs, t->naddrs, sd->family, addr, sizeof(addr));
        if (picked < 0) {
            const struct addr_job *j = job_for(lk, t->name);
            if (j)
                picked = srv_pick_addr(j->addrs, j->naddrs, sd->family, addr, sizeof(addr));
        }
        if (picked < 0) {
            emx_logline_add(&skipped, "%s%s", skipped.len ? ", " : "", t->name);
            continue;
        }
        struct item *it = &p.items[p.count++];
        it->id = dup_printf("%s:%u", t->name, t->port);
        it->host = dup_str(addr);
        it->metadata = dup_printf("srv %s target %s", ns->name, t->name);
        it->port = t->port;
        it->weight = t->weight;
        it->priority = t->priority;
        if (!it->id || !it->host || !it->metadata) {
            part_free(&p);
            name_failed(ns, "out of memory");
            return;
        }
    }
    part_normalize(&p);
    name_good(ns, &p, ttl, ttl_known, skipped.len ? dup_str(skipped.buf) : NULL,
              lk->ans.outcome == SRV_NXDOMAIN ? " (NXDOMAIN)"
              : lk->ans.outcome == SRV_NODATA ? " (no SRV record)"
                                              : "");
}

static void lookup_unref(struct lookup *lk)
{
    if (--lk->pending > 0)
        return;
    struct name_state *ns = lk->ns;
    ns->lookup = NULL;
    if (!lk->sd->stopped) {
        if (lk->failed)
            name_failed(ns, lk->reason);
        else
            lookup_complete(lk);
    }
    lookup_free(lk);
}

static void arm_ares_timer(struct srv_disc *sd);
static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen);

/* Asks the question of the next resolver in turn. */
static void ask(struct query *q)
{
    struct srv_disc *sd = q->lk->sd;
    struct resolver *rv = &sd->resolvers[(q->first + q->tried) % sd->nresolvers];
    q->tried++;
    q->lk->pending++;
    ares_query(rv->channel, q->name, DNS_C_IN, q->qtype, on_answer, q);
}

static const char *qtype_name(uint16_t qtype)
{
    return qtype == DNS_T_SRV ? "SRV" : qtype == DNS_T_A ? "A" : "AAAA";
}

/* The SRV answer is in: targets the additional section gave no usable
 * address for are asked for on their own, each host once, starting with
 * the resolver that answered. */
static void srv_answered(struct lookup *lk, size_t resolver)
{
    struct srv_disc *sd = lk->sd;
    char scratch[INET6_ADDRSTRLEN], norm[DNS_NAME_TEXT_MAX];

    if (lk->ans.count && !(lk->jobs = calloc(lk->ans.count, sizeof(*lk->jobs)))) {
        lookup_fail(lk, "out of memory");
        return;
    }
    for (size_t i = 0; i < lk->ans.count; i++) {
        const struct srv_target *t = &lk->ans.targets[i];
        if (!t->name[0] || t->port == 0 ||
            srv_pick_addr(t->addrs, t->naddrs, sd->family, scratch, sizeof(scratch)) >= 0 ||
            job_for(lk, t->name))
            continue;
        if (dns_name_normalize(t->name, norm, sizeof(norm)) != 0)
            continue; /* not a host name: left out as a target without an address */
        struct addr_job *j = &lk->jobs[lk->njobs];
        if (!(j->host = dup_str(t->name))) {
            lookup_fail(lk, "out of memory");
            return;
        }
        lk->njobs++;
    }
    for (size_t i = 0; i < lk->njobs; i++) {
        struct addr_job *j = &lk->jobs[i];
        const uint16_t types[2] = {DNS_T_A, DNS_T_AAAA};
        for (int k = 0; k < 2; k++) {
            if ((sd->family == SRV_FAMILY_IPV4 && types[k] == DNS_T_AAAA) ||
                (sd->family == SRV_FAMILY_IPV6 && types[k] == DNS_T_A))
                continue;
            j->q[k] = (struct query){
                .lk = lk, .job = j, .name = j->host, .qtype = types[k], .first = resolver};
            ask(&j->q[k]);
        }
    }
}

/* Reads one answer: 0 when it is one (the lookup took what it says), or
 * -1 with `err` saying why this resolver failed. */
static int take_answer(struct query *q, int status, unsigned char *abuf, int alen, char *err,
                       size_t errlen)
{
    struct lookup *lk = q->lk;
    if (status != ARES_SUCCESS && status != ARES_ENODATA && status != ARES_ENOTFOUND) {
        snprintf(err, errlen, "%s", status_text(status));
        return -1;
    }
    if (!abuf || alen <= 0) {
        snprintf(err, errlen, "no answer bytes");
        return -1;
    }
    char why[REASON_MAX / 2];
    int rc;
    if (!q->job) {
        rc = srv_answer_parse(abuf, (size_t)alen, q->name, &lk->ans, why, sizeof(why));
    } else {
        struct addr_job *j = q->job;
        struct srv_addr *addrs = NULL;
        size_t n = 0;
        uint32_t ttl = 0;
        bool known = false;
        rc = srv_addr_answer_parse(abuf, (size_t)alen, q->name, q->qtype, &addrs, &n, &ttl, &known,
                                   why, sizeof(why));
        if (rc == 0 && n) {
            struct srv_addr *all = realloc(j->addrs, (j->naddrs + n) * sizeof(*all));
            if (!all) {
                rc = -ENOMEM;
            } else {
                memcpy(all + j->naddrs, addrs, n * sizeof(*all));
                j->addrs = all;
                j->naddrs += n;
            }
        }
        if (rc == 0 && known && (!j->ttl_known || ttl < j->ttl)) {
            j->ttl = ttl;
            j->ttl_known = true;
        }
        free(addrs);
    }
    if (rc == -ENOMEM) {
        lookup_fail(lk, "out of memory");
        return 0; /* not the resolver's fault: no other is asked */
    }
    if (rc) {
        snprintf(err, errlen, "%s: %s", rc == -EPROTO ? "answered" : "malformed answer", why);
        return -1;
    }
    return 0;
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct query *q = arg;
    struct lookup *lk = q->lk;
    struct srv_disc *sd = lk->sd;
    size_t resolver = (q->first + q->tried - 1) % sd->nresolvers;
    char err[REASON_MAX];
    (void)timeouts;

    if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED || sd->stopped) {
        lookup_fail(lk, "cancelled");
    } else if (lk->failed) {
        /* another question of this lookup failed already: nothing to add */
    } else if (take_answer(q, status, abuf, alen, err, sizeof(err)) == 0) {
        if (!q->job && !lk->failed)
            srv_answered(lk, resolver);
    } else {
        size_t n = strlen(q->why);
        snprintf(q->why + n, sizeof(q->why) - n, "%s%s%s%s", n ? "; " : "",
                 sd->nresolvers > 1 ? sd->resolvers[resolver].label : "",
                 sd->nresolvers > 1 ? " " : "", err);
        if (q->tried < sd->nresolvers)
            ask(q);
        else if (q->job)
            lookup_fail(lk, "%s %s query: %s", q->name, qtype_name(q->qtype), q->why);
        else
            lookup_fail(lk, "SRV query: %s", q->why);
    }
    lookup_unref(lk);
}

static void name_query(struct name_state *ns)
{
    struct srv_disc *sd = ns->sd;
    if (sd->stopped || ns->lookup)
        return;
    struct lookup *lk = calloc(1, sizeof(*lk));
    if (!lk) {
        name_failed(ns, "out of memory");
        return;
    }
    lk->sd = sd;
    lk->ns = ns;
    lk->pending = 1; /* held until the question below was asked */
    ns->lookup = lk;
    lk->srv = (struct query){.lk = lk, .name = ns->name, .qtype = DNS_T_SRV};
    ask(&lk->srv);
    lookup_unref(lk);
    arm_ares_timer(sd);
}

static void on_name_timer(uv_timer_t *t)
{
    name_query(t->data);
}

/* ---- c-ares on the loop ---- */

static void on_ares_timer(uv_timer_t *t)
{
    struct srv_disc *sd = t->data;
    for (size_t i = 0; i < sd->nresolvers && !sd->stopped; i++)
        if (sd->resolvers[i].up)
            ares_process_fd(sd->resolvers[i].channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    arm_ares_timer(sd);
}

/* One timer for every channel: the soonest of their timeouts. */
static void arm_ares_timer(struct srv_disc *sd)
{
    if (!sd->timer_up || sd->stopped)
        return;
    struct timeval tv, *next = NULL;
    for (size_t i = 0; i < sd->nresolvers; i++) {
        struct timeval mine;
        if (!sd->resolvers[i].up)
            continue;
        struct timeval *t = ares_timeout(sd->resolvers[i].channel, next, &mine);
        if (t) {
            tv = *t;
            next = &tv;
        }
    }
    if (!next) {
        uv_timer_stop(&sd->ares_timer);
        return;
    }
    uint64_t ms = (uint64_t)next->tv_sec * 1000u + ((uint64_t)next->tv_usec + 999u) / 1000u;
    uv_timer_start(&sd->ares_timer, on_ares_timer, ms, 0);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct sock_watch *w = p->data;
    struct resolver *rv = w->rv;
    ares_socket_t rd = ARES_SOCKET_BAD, wr = ARES_SOCKET_BAD;
    if (status < 0) {
        rd = wr = w->fd; /* let c-ares meet the error on the socket */
    } else {
        if (events & (UV_READABLE | UV_DISCONNECT))
            rd = w->fd;
        if (events & UV_WRITABLE)
            wr = w->fd;
    }
    if (rv->up && !rv->sd->stopped)
        ares_process_fd(rv->channel, rd, wr); /* may close this watch: w not used after */
    arm_ares_timer(rv->sd);
}

static void on_watch_closed(uv_handle_t *h)
{
    struct sock_watch *w = h->data;
    struct srv_disc *sd = w->rv->sd;
    free(w);
    sd->open_handles--;
    maybe_free(sd);
}

/* c-ares says which of its sockets to watch; 0/0 comes before it closes one,
 * so the watch is stopped while the descriptor is still open. */
static void on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct resolver *rv = data;
    struct srv_disc *sd = rv->sd;
    struct sock_watch **pp = &sd->socks, *w;
    for (; (w = *pp); pp = &w->next)
        if (w->fd == fd)
            break;
    if (!readable && !writable) {
        if (w) {
            *pp = w->next;
            uv_poll_stop(&w->poll);
            uv_close((uv_handle_t *)&w->poll, on_watch_closed);
        }
        return;
    }
    if (!w) {
        if (!(w = calloc(1, sizeof(*w)))) {
            LOG(sd, EMX_LOG_ERROR, "out of memory watching a resolver socket");
            return; /* its query times out */
        }
        int rc = uv_poll_init_socket(sd->host->loop, &w->poll, fd);
        if (rc < 0) {
            LOG(sd, EMX_LOG_ERROR, "cannot watch a resolver socket: %s", uv_strerror(rc));
            free(w);
            return;
        }
        w->fd = fd;
        w->rv = rv;
        w->poll.data = w;
        w->next = sd->socks;
        sd->socks = w;
        sd->open_handles++;
    }
    int rc = uv_poll_start(&w->poll, (readable ? UV_READABLE : 0) | (writable ? UV_WRITABLE : 0),
                           on_poll);
    if (rc < 0)
        LOG(sd, EMX_LOG_ERROR, "cannot watch a resolver socket: %s", uv_strerror(rc));
}

/* ---- life cycle ---- */

static void handle_closed(struct srv_disc *sd)
{
    sd->open_handles--;
    maybe_free(sd);
}

static void on_ares_timer_closed(uv_handle_t *h)
{
    handle_closed(h->data);
}

static void on_name_timer_closed(uv_handle_t *h)
{
    handle_closed(((struct name_state *)h->data)->sd);
}

static void close_handle(uv_handle_t *h, uv_close_cb cb)
{
    if (h->loop && !uv_is_closing(h))
        uv_close(h, cb);
}

/* Ends every query (their callbacks run now, with ARES_EDESTRUCTION), closes
 * the sockets' watches and the timers. No host call follows but log. */
static void shut(struct srv_disc *sd)
{
    sd->stopped = true;
    for (size_t i = 0; i < sd->nresolvers; i++) {
        if (sd->resolvers[i].up) {
            sd->resolvers[i].up = false;
            ares_destroy(sd->resolvers[i].channel);
        }
    }
    if (sd->timer_up)
        close_handle((uv_handle_t *)&sd->ares_timer, on_ares_timer_closed);
    for (size_t i = 0; i < sd->nnames; i++)
        close_handle((uv_handle_t *)&sd->names[i].timer, on_name_timer_closed);
}

static void disc_free(struct srv_disc *sd)
{
    for (size_t i = 0; i < sd->nnames; i++) {
        struct name_state *ns = &sd->names[i];
        free(ns->name);
        part_free(&ns->good);
        free(ns->failure);
        free(ns->skipped);
    }
    free(sd->names);
    emx_instset_free(&sd->reported);
    if (sd->lib_up)
        ares_library_cleanup();
    free(sd);
}

static void maybe_free(struct srv_disc *sd)
{
    if (sd->destroyed && sd->open_handles == 0)
        disc_free(sd);
}

/* "ip", "ip:port", "[ipv6]" or "[ipv6]:port". */
static int parse_resolver(const char *text, struct ares_addr_port_node *out)
{
    char host[INET6_ADDRSTRLEN + 2];
    const char *port = NULL;
    size_t n = strlen(text);

    memset(out, 0, sizeof(*out));
    if (text[0] == '[') {
        const char *end = strchr(text, ']');
        if (!end || (size_t)(end - text - 1) >= sizeof(host))
            return -EINVAL;
        memcpy(host, text + 1, (size_t)(end - text - 1));
        host[end - text - 1] = '\0';
        if (end[1] == ':')
            port = end + 2;
        else if (end[1])
            return -EINVAL;
    } else {
        const char *colon = strchr(text, ':');
        if (colon && !strchr(colon + 1, ':')) {
            n = (size_t)(colon - text);
            port = colon + 1;
        }
        if (n >= sizeof(host))
            return -EINVAL;
        memcpy(host, text, n);
        host[n] = '\0';
    }
    long p = 53;
    if (port) {
        char *end;
        errno = 0;
        p = strtol(port, &end, 10);
        if (errno || end == port || *end || p < 1 || p > 65535)
            return -EINVAL;
    }
    if (inet_pton(AF_INET, host, &out->addr.addr4) == 1)
        out->family = AF_INET;
    else if (inet_pton(AF_INET6, host, &out->addr.addr6) == 1)
        out->family = AF_INET6;
    else
        return -EINVAL;
    out->udp_port = out->tcp_port = (int)p;
    return 0;
}

static int srv_create(const struct emx_host *host, const void *config, void **instance)
{
    const struct srv_config *cfg = config;
    struct srv_disc *sd;
    char norm[DNS_NAME_TEXT_MAX];
    int rc = -EINVAL;

    if (!EMX_HOST_HAS(host, discovery_failed))
        return -ENOTSUP;
    if (cfg->names.count == 0) {
        host->log(host, EMX_LOG_ERROR, "names: at least one SRV name is required");
        return -EINVAL;
    }
    if (cfg->names.count > NAMES_MAX) {
        host->log(host, EMX_LOG_ERROR, "names: at most %d names, found %zu", NAMES_MAX,
                  cfg->names.count);
        return -EINVAL;
    }
    if (cfg->resolvers.count > RESOLVERS_MAX) {
        host->log(host, EMX_LOG_ERROR, "resolvers: at most %d, found %zu", RESOLVERS_MAX,
                  cfg->resolvers.count);
        return -EINVAL;
    }
    if (cfg->min_ttl_ms < MIN_TTL_FLOOR || cfg->max_ttl_ms < cfg->min_ttl_ms) {
        host->log(host, EMX_LOG_ERROR,
                  "min_ttl, max_ttl: expected %dms <= min_ttl <= max_ttl, found %llu ms and %llu "
                  "ms",
                  MIN_TTL_FLOOR, (unsigned long long)cfg->min_ttl_ms,
                  (unsigned long long)cfg->max_ttl_ms);
        return -EINVAL;
    }
    if (cfg->timeout_ms < 10 || cfg->timeout_ms > 60000) {
        host->log(host, EMX_LOG_ERROR, "timeout: expected 10ms..60s, found %llu ms",
                  (unsigned long long)cfg->timeout_ms);
        return -EINVAL;
    }
    if (cfg->tries < 1 || cfg->tries > TRIES_MAX) {
        host->log(host, EMX_LOG_ERROR, "tries: expected 1..%d, found %lld", TRIES_MAX,
                  (long long)cfg->tries);
        return -EINVAL;
    }
    if (cfg->retry_min_ms < 10 || cfg->retry_max_ms < cfg->retry_min_ms) {
        host->log(host, EMX_LOG_ERROR,
                  "retry_min, retry_max: expected 10ms <= retry_min <= retry_max, found %llu ms "
                  "and %llu ms",
                  (unsigned long long)cfg->retry_min_ms, (unsigned long long)cfg->retry_max_ms);
        return -EINVAL;
    }
    enum srv_family family;
    const char *fam = cfg->family ? cfg->family : "any";
    if (strcmp(fam, "any") == 0)
        family = SRV_FAMILY_ANY;
    else if (strcmp(fam, "ipv4") == 0)
        family = SRV_FAMILY_IPV4;
    else if (strcmp(fam, "ipv6") == 0)
        family = SRV_FAMILY_IPV6;
    else {
        host->log(host, EMX_LOG_ERROR, "family: expected any, ipv4 or ipv6, found '%.64s'", fam);
        return -EINVAL;
    }

    if (!(sd = calloc(1, sizeof(*sd))))
        return -ENOMEM;
    sd->host = host;
    sd->tls = cfg->tls;
    sd->min_ttl_ms = cfg->min_ttl_ms;
    sd->max_ttl_ms = cfg->max_ttl_ms;
    sd->timeout_ms = cfg->timeout_ms;
    sd->tries = (int)cfg->tries;
    sd->retry_min_ms = cfg->retry_min_ms;
    sd->retry_max_ms = cfg->retry_max_ms;
    sd->family = family;
    sd->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)sd;
    if (!sd->rng)
        sd->rng = 0x9E3779B97F4A7C15ull;

    for (size_t i = 0; i < cfg->resolvers.count; i++) {
        const char *r = cfg->resolvers.items[i];
        if (!r || parse_resolver(r, &sd->resolvers[i].addr) != 0) {
            host->log(host, EMX_LOG_ERROR,
                      "resolvers[%zu]: expected ip, ip:port or [ipv6]:port, found '%.80s'", i,
                      r ? r : "");
            goto fail;
        }
        sd->nresolvers++;
    }
    if (!(sd->names = calloc(cfg->names.count, sizeof(*sd->names)))) {
        rc = -ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < cfg->names.count; i++) {
        const char *n = cfg->names.items[i];
        if (!n || dns_name_normalize(n, norm, sizeof(norm)) != 0) {
            host->log(host, EMX_LOG_ERROR,
                      "names[%zu]: '%.80s' is not a DNS name (letters, digits, '-', '_', dots)", i,
                      n ? n : "");
            goto fail;
        }
        for (size_t j = 0; j < sd->nnames; j++) {
            if (strcmp(sd->names[j].name, norm) == 0) {
                host->log(host, EMX_LOG_ERROR, "names[%zu]: '%s' is listed twice", i, n);
                goto fail;
            }
        }
        struct name_state *ns = &sd->names[sd->nnames];
        ns->sd = sd;
        if (!(ns->name = dup_str(norm))) {
            rc = -ENOMEM;
            goto fail;
        }
        sd->nnames++;
    }
    int arc = ares_library_init(ARES_LIB_INIT_ALL);
    if (arc != ARES_SUCCESS) {
        host->log(host, EMX_LOG_ERROR, "c-ares: %s", ares_strerror(arc));
        rc = -ENOMEM;
        goto fail;
    }
    sd->lib_up = true;
    *instance = sd;
    return 0;
fail:
    disc_free(sd);
    return rc;
}

static void resolver_label(struct resolver *rv)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = rv->addr.udp_port ? rv->addr.udp_port : 53;
    inet_ntop(rv->addr.family, &rv->addr.addr, ip, sizeof(ip));
    snprintf(rv->label, sizeof(rv->label), rv->addr.family == AF_INET6 ? "[%s]:%d" : "%s:%d", ip,
             port);
}

/* Without configured resolvers, those c-ares reads from /etc/resolv.conf
 * (127.0.0.1 when it names none). */
static int system_resolvers(struct srv_disc *sd, struct ares_options *opts, int mask)
{
    ares_channel ch;
    struct ares_addr_port_node *list = NULL;
    int arc = ares_init_options(&ch, opts, mask & ~ARES_OPT_SOCK_STATE_CB);
    if (arc != ARES_SUCCESS) {
        LOG(sd, EMX_LOG_ERROR, "cannot start c-ares: %s", ares_strerror(arc));
        return arc == ARES_ENOMEM ? -ENOMEM : -EIO;
    }
    arc = ares_get_servers_ports(ch, &list);
    for (struct ares_addr_port_node *n = list; arc == ARES_SUCCESS && n; n = n->next) {
        if (sd->nresolvers == RESOLVERS_MAX) {
            LOG(sd, EMX_LOG_WARN, "/etc/resolv.conf: only the first %d resolvers are used",
                RESOLVERS_MAX);
            break;
        }
        struct ares_addr_port_node *r = &sd->resolvers[sd->nresolvers++].addr;
        *r = *n;
        r->next = NULL;
    }
    ares_free_data(list);
    ares_destroy(ch);
    if (arc != ARES_SUCCESS || sd->nresolvers == 0) {
        LOG(sd, EMX_LOG_ERROR, "no resolver: %s",
            arc != ARES_SUCCESS ? ares_strerror(arc) : "none in /etc/resolv.conf");
        return -EIO;
    }
    return 0;
}

static int srv_start(void *instance)
{
    struct srv_disc *sd = instance;
    uv_loop_t *loop = sd->host->loop;
    struct ares_options opts;
    int rc;

    memset(&opts, 0, sizeof(opts));
    /* No ARES_FLAG_IGNTC: a truncated UDP answer is asked again over TCP.
     * ARES_FLAG_NOCHECKRESP: SERVFAIL and REFUSED reach the callback as
     * themselves (c-ares 1.18 otherwise reports "connection refused"); the
     * next resolver is then asked by this plugin. */
    opts.flags = ARES_FLAG_NOCHECKRESP;
    opts.timeout = (int)sd->timeout_ms;
    opts.tries = sd->tries;
    opts.sock_state_cb = on_sock_state;
    int mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_SOCK_STATE_CB;
    if (!sd->nresolvers && (rc = system_resolvers(sd, &opts, mask)) < 0)
        return rc;
    for (size_t i = 0; i < sd->nresolvers; i++) {
        struct resolver *rv = &sd->resolvers[i];
        rv->sd = sd;
        resolver_label(rv);
        opts.sock_state_cb_data = rv;
        int arc = ares_init_options(&rv->channel, &opts, mask);
        if (arc != ARES_SUCCESS) {
            LOG(sd, EMX_LOG_ERROR, "cannot start c-ares: %s", ares_strerror(arc));
            return arc == ARES_ENOMEM ? -ENOMEM : -EIO;
        }
        rv->up = true;
        rv->addr.next = NULL;
        if ((arc = ares_set_servers_ports(rv->channel, &rv->addr)) != ARES_SUCCESS) {
            LOG(sd, EMX_LOG_ERROR, "cannot set resolver %s: %s", rv->label, ares_strerror(arc));
            return -EIO;
        }
    }
    if ((rc = uv_timer_init(loop, &sd->ares_timer)) < 0)
        goto fail;
    sd->ares_timer.data = sd;
    sd->timer_up = true;
    sd->open_handles++;
    for (size_t i = 0; i < sd->nnames; i++) {
        struct name_state *ns = &sd->names[i];
        if ((rc = uv_timer_init(loop, &ns->timer)) < 0)
            goto fail;
        ns->timer.data = ns;
        sd->open_handles++;
    }
    sd->first_pending = sd->nnames;
    LOG(sd, EMX_LOG_DEBUG, "started: %zu name%s, resolver%s %s%s", sd->nnames,
        sd->nnames == 1 ? "" : "s", sd->nresolvers == 1 ? "" : "s", sd->resolvers[0].label,
        sd->nresolvers > 1 ? " and more" : "");
    for (size_t i = 0; i < sd->nnames; i++)
        name_query(&sd->names[i]);
    return 0;
fail:
    /* destroy closes what was initialised. */
    LOG(sd, EMX_LOG_ERROR, "cannot start: %s", uv_strerror(rc));
    return rc;
}

static void srv_stop(void *instance)
{
    shut(instance);
}

static void srv_destroy(void *instance)
{
    struct srv_disc *sd = instance;
    if (!sd)
        return;
    shut(sd);
    sd->destroyed = true;
    maybe_free(sd);
}

/* New names or resolvers mean a new baseline: recreating is simpler. */
static int srv_reconfigure(void *instance, const void *config)
{
    (void)instance;
    (void)config;
    return -ENOTSUP;
}

#define OPT(name_, type_, def_, required_, field_, help_)                                          \
    {                                                                                              \
        (name_), NULL, (type_), (def_), (required_), offsetof(struct srv_config, field_), (help_)  \
    }

static const struct emx_option srv_options[] = {
    OPT("names", EMX_OPT_STRING_LIST, NULL, true, names,
        "SRV names to ask, e.g. _thingworx._tcp.example.com.; the set is their union"),
    OPT("resolvers", EMX_OPT_STRING_LIST, NULL, false, resolvers,
        "DNS servers as ip, ip:port or [ipv6]:port; default: those of /etc/resolv.conf"),
    OPT("tls", EMX_OPT_BOOL, "false", false, tls, "wss to the instances found"),
    OPT("min_ttl", EMX_OPT_DURATION, "1s", false, min_ttl_ms,
        "ask again no sooner than this, whatever the records' TTL (TTL 0 too)"),
    OPT("max_ttl", EMX_OPT_DURATION, "300s", false, max_ttl_ms,
        "ask again no later than this, whatever the records' TTL"),
    OPT("timeout", EMX_OPT_DURATION, "2s", false, timeout_ms,
        "wait this long for the first answer of a query (c-ares doubles it for each round)"),
    OPT("tries", EMX_OPT_INT, "2", false, tries, "rounds over the resolvers before a query fails"),
    OPT("retry_min", EMX_OPT_DURATION, "1s", false, retry_min_ms,
        "after a failure ask again this soon, doubling with each failure in a row"),
    OPT("retry_max", EMX_OPT_DURATION, "60s", false, retry_max_ms,
        "the longest wait between retries after failures"),
    OPT("family", EMX_OPT_STRING, "any", false, family,
        "address family of instances: any (IPv4 if the target has one, else IPv6), ipv4, ipv6"),
    EMX_OPTION_END,
};

EMX_PLUGIN_EXPORT const struct emx_discovery_plugin emx_discovery_plugin = {
    .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_DISCOVERY, struct emx_discovery_plugin, "dns-srv", "0.1.0"),
    .options = srv_options,
    .config_size = sizeof(struct srv_config),
    .create = srv_create,
    .start = srv_start,
    .stop = srv_stop,
    .destroy = srv_destroy,
    .reconfigure = srv_reconfigure,
};
