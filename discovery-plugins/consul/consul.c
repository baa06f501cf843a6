/* emx-discovery-consul: platform instances from Consul's health API.
 *
 * One blocking query at a time: GET /v1/health/service/<service>?passing,
 * with index=<X-Consul-Index of the last answer> and wait=<wait>, so Consul
 * holds the request until the service's instances change. libcurl's multi
 * interface runs on the host's loop: curl tells us which sockets to watch
 * (uv_poll) and when to call it back (uv_timer); nothing here blocks.
 *
 * Index handling follows Consul's blocking-query guidance: an index that
 * goes backwards resets to 0 (a fresh non-blocking query), an index below 1
 * is never sent, and consecutive queries are at least min_interval apart so
 * a query that returns at once cannot become a hot loop. Failures keep the
 * last good set in the core and back off with jitter.
 */
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "consul_parse.h"
#include "edgemux/discovery.h"
#include "instset.h"

#define TOKEN_MAX       512
#define WAIT_MAX_MS     (10u * 60 * 1000) /* Consul caps wait at 10 minutes */
#define MAX_SIZE_LIMIT  (256u * 1024 * 1024)
#define SNIPPET_MAX     80 /* bytes of an error body shown in a reason */
#define REASON_MAX      512
#define DEFAULT_ADDRESS "http://127.0.0.1:8500"

struct consul_config {
    const char *address;
    const char *service;
    const char *tag;
    const char *datacenter;
    bool tls;
    const char *tls_meta;
    const char *priority_meta;
    uint64_t wait_ms;
    const char *token_file;
    const char *ca_file;
    uint64_t min_interval_ms;
    uint64_t backoff_min_ms;
    uint64_t backoff_max_ms;
    uint64_t timeout_ms;
    uint64_t max_size;
};

struct consul_disc;

/* One socket libcurl asked us to watch. */
struct sock {
    uv_poll_t poll;
    struct consul_disc *cd;
    curl_socket_t fd;
    struct sock *next;
};

struct consul_disc {
    const struct emx_host *host; /* borrowed until destroy */
    char *base;                  /* address without trailing '/' */
    char *path_query;            /* "/v1/health/service/<svc>?passing[&tag=…][&dc=…]" */
    char *ca_file;
    struct curl_slist *headers; /* holds the token: wiped before it is freed */
    struct consul_filter filter;
    char *tag, *tls_meta, *priority_meta;
    uint64_t wait_ms, min_interval_ms, backoff_min_ms, backoff_max_ms, timeout_ms;
    size_t max_size;

    CURLM *multi;
    CURL *easy; /* the query in flight, or NULL */
    uv_timer_t curl_timer;
    uv_timer_t next; /* starts the next query */
    unsigned open_handles;
    struct sock *socks;

    /* The query in flight. */
    char *body;
    size_t body_len, body_cap;
    bool too_large;
    bool have_index_hdr;
    char index_hdr[32];
    bool index_hdr_bad;
    uint64_t sent_index;
    uint64_t started_ms;
    char errbuf[CURL_ERROR_SIZE];

    uint64_t index; /* 0: no index, the next query does not block */
    unsigned failures;
    uint64_t rng;

    struct emx_instset good;
    bool have_good;
    bool failing; /* the last query failed: report the next good answer even if unchanged */

    bool started, stopped, destroyed;
};

static void maybe_free(struct consul_disc *cd);
static void schedule(struct consul_disc *cd, uint64_t delay_ms);
static void on_next(uv_timer_t *t);

/* ---- small helpers ---- */

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static char *dup_opt(const char *s)
{
    return s ? dup_n(s, strlen(s)) : NULL;
}

static uint64_t rand_next(struct consul_disc *cd)
{
    /* xorshift64*: jitter only, no security role. */
    uint64_t x = cd->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    cd->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* ---- reporting ---- */

/* The parser's set in the shape the core takes. 0 or -ENOMEM. */
static int to_instset(const struct consul_set *set, struct emx_instset *out)
{
    for (size_t i = 0; i < set->count; i++) {
        const struct consul_instance *in = &set->items[i];
        if (emx_instset_add(out, in->id, in->host, in->port, in->tls, in->weight, in->priority,
                            in->metadata) < 0) {
            emx_instset_free(out);
            return -ENOMEM;
        }
    }
    return 0;
}

static void report_good(struct consul_disc *cd, struct consul_set *parsed)
{
    const struct emx_host *h = cd->host;
    struct emx_instset set = {NULL, 0, 0};

    if (to_instset(parsed, &set) < 0) {
        /* Keep "failing" set so the next answer is reported whatever it is. */
        h->log(h, EMX_LOG_ERROR, "out of memory reporting %zu instances", parsed->count);
        cd->failing = true;
        return;
    }
    if (cd->have_good && !cd->failing && emx_instset_equal(&cd->good, &set)) {
        h->log(h, EMX_LOG_DEBUG, "unchanged (%zu instances, index %llu)", set.count,
               (unsigned long long)cd->index);
        emx_instset_free(&set);
        return;
    }
    if (cd->failing && cd->have_good)
        h->log(h, EMX_LOG_INFO, "consul answers again");

    char note[64] = "";
    if (parsed->skipped)
        snprintf(note, sizeof(note), " (%zu entr%s filtered out)", parsed->skipped,
                 parsed->skipped == 1 ? "y" : "ies");
    emx_instset_log_changes(h, NULL, note, cd->have_good ? &cd->good : NULL, &set);

    emx_instset_report(h, &set);
    emx_instset_free(&cd->good);
    cd->good = set;
    cd->have_good = true;
    cd->failing = false;
}

/* Next query after a failure: exponential from backoff_min, capped at
 * backoff_max, uniformly jittered over its upper half so many edgemux
 * processes do not return to a recovering Consul in step. */
static uint64_t backoff_delay(struct consul_disc *cd)
{
    uint64_t d = cd->backoff_min_ms;
    for (unsigned i = 1; i < cd->failures && d < cd->backoff_max_ms; i++)
        d *= 2;
    if (d > cd->backoff_max_ms)
        d = cd->backoff_max_ms;
    uint64_t half = d / 2;
    return d - half + (half ? rand_next(cd) % (half + 1) : 0);
}

/* Delay that keeps query starts at least min_interval apart. */
static uint64_t rate_delay(struct consul_disc *cd, uint64_t want_ms)
{
    uint64_t now = cd->host->now_ms(cd->host);
    uint64_t earliest = cd->started_ms + cd->min_interval_ms;
    uint64_t d = earliest > now ? earliest - now : 0;
    return d > want_ms ? d : want_ms;
}

static void report_failure(struct consul_disc *cd, const char *reason)
{
    const struct emx_host *h = cd->host;
    cd->failures++;
    cd->failing = true;
    /* After an outage the first query must not block: the core should learn
     * at once that the source works again. */
    cd->index = 0;
    uint64_t delay = rate_delay(cd, backoff_delay(cd));
    h->log(h, cd->failures == 1 ? EMX_LOG_WARN : EMX_LOG_DEBUG,
           "%s; keeping the last good set (%zu instance%s); retry in %llu ms (failure %u)", reason,
           cd->good.count, cd->good.count == 1 ? "" : "s", (unsigned long long)delay, cd->failures);
    h->discovery_failed(h, reason);
    schedule(cd, delay);
}

/* ---- one query ---- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    struct consul_disc *cd = arg;
    size_t n = size * nmemb;
    if (n > cd->max_size - cd->body_len) {
        cd->too_large = true;
        return 0; /* curl fails the transfer with CURLE_WRITE_ERROR */
    }
    if (cd->body_len + n + 1 > cd->body_cap) {
        size_t cap = cd->body_cap ? cd->body_cap : 4096;
        while (cap < cd->body_len + n + 1)
            cap *= 2;
        char *nb = realloc(cd->body, cap);
        if (!nb)
            return 0;
        cd->body = nb;
        cd->body_cap = cap;
    }
    memcpy(cd->body + cd->body_len, data, n);
    cd->body_len += n;
    cd->body[cd->body_len] = '\0';
    return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *arg)
{
    struct consul_disc *cd = arg;
    size_t n = size * nmemb;
    static const char name[] = "x-consul-index:";
    const size_t nl = sizeof(name) - 1;

    /* A new status line (after a 100 Continue) starts a new header block. */
    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        cd->have_index_hdr = false;
        cd->index_hdr_bad = false;
        return n;
    }
    if (n < nl || strncasecmp(data, name, nl) != 0)
        return n;
    size_t vlen = n - nl;
    if (cd->have_index_hdr || vlen >= sizeof(cd->index_hdr)) {
        cd->index_hdr_bad = true; /* repeated or absurdly long */
        return n;
    }
    memcpy(cd->index_hdr, data + nl, vlen);
    cd->index_hdr[vlen] = '\0';
    cd->have_index_hdr = true;
    return n;
}

static void end_query(struct consul_disc *cd)
{
    if (cd->easy) {
        curl_multi_remove_handle(cd->multi, cd->easy);
        curl_easy_cleanup(cd->easy);
        cd->easy = NULL;
    }
    cd->body_len = 0;
}

/* Up to SNIPPET_MAX printable bytes of an error body, for the reason. */
static void body_snippet(const struct consul_disc *cd, char *out, size_t size)
{
    size_t o = 0;
    out[0] = '\0';
    if (!cd->body || size < 8)
        return;
    for (size_t i = 0; i < cd->body_len && i < SNIPPET_MAX && o + 4 < size; i++) {
        unsigned char ch = (unsigned char)cd->body[i];
        out[o++] = (ch < 0x20 || ch >= 0x7f) ? ' ' : (char)ch;
    }
    while (o > 0 && out[o - 1] == ' ')
        o--;
    if (cd->body_len > SNIPPET_MAX && o + 4 < size) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

static void query_done(struct consul_disc *cd, CURLcode res)
{
    const struct emx_host *h = cd->host;
    char reason[REASON_MAX];
    long status = 0;

    curl_easy_getinfo(cd->easy, CURLINFO_RESPONSE_CODE, &status);
    if (res != CURLE_OK) {
        if (cd->too_large)
            snprintf(reason, sizeof(reason), "%s: answer larger than max_size (%zu bytes)",
                     cd->base, cd->max_size);
        else
            snprintf(reason, sizeof(reason), "%s: %s", cd->base,
                     cd->errbuf[0] ? cd->errbuf : curl_easy_strerror(res));
        goto failed;
    }
    if (status != 200) {
        char snip[SNIPPET_MAX + 8];
        body_snippet(cd, snip, sizeof(snip));
        snprintf(reason, sizeof(reason), "%s: HTTP %ld%s%s%s", cd->base, status,
                 status == 403 ? " (ACL token missing, wrong or without permission)" : "",
                 snip[0] ? ": " : "", snip);
        goto failed;
    }
    uint64_t idx;
    if (!cd->have_index_hdr || cd->index_hdr_bad ||
        consul_parse_index(cd->index_hdr, strlen(cd->index_hdr), &idx) < 0) {
        snprintf(reason, sizeof(reason), "%s: answer without a valid X-Consul-Index header",
                 cd->base);
        goto failed;
    }
    if (idx < cd->index) {
        /* Consul's guidance: an index that goes backwards (a server restored,
         * another cluster) means start over with a non-blocking query; this
         * answer may be stale, so it is not applied. */
        h->log(h, EMX_LOG_WARN, "X-Consul-Index went backwards (%llu after %llu); starting over",
               (unsigned long long)idx, (unsigned long long)cd->index);
        cd->index = 0;
        end_query(cd);
        schedule(cd, rate_delay(cd, 0));
        return;
    }

    struct consul_set set;
    char perr[256];
    int rc =
        consul_parse(cd->body ? cd->body : "", cd->body_len, &cd->filter, &set, perr, sizeof(perr));
    if (rc < 0) {
        snprintf(reason, sizeof(reason), "%s: bad answer: %s", cd->base, perr);
        goto failed;
    }
    if (idx == 0)
        h->log(h, EMX_LOG_DEBUG, "X-Consul-Index 0: the next query will not block");
    cd->index = idx;
    cd->failures = 0;
    end_query(cd);
    report_good(cd, &set);
    consul_set_free(&set);
    schedule(cd, rate_delay(cd, 0));
    return;

failed:
    end_query(cd);
    report_failure(cd, reason);
}

static void check_done(struct consul_disc *cd)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(cd->multi, &left))) {
        if (msg->msg != CURLMSG_DONE || msg->easy_handle != cd->easy)
            continue;
        query_done(cd, msg->data.result);
        if (cd->stopped)
            return;
    }
}

static int append(char *buf, size_t size, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int append(char *buf, size_t size, size_t *len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, size - *len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= size - *len)
        return -ENAMETOOLONG;
    *len += (size_t)n;
    return 0;
}

static int start_query(struct consul_disc *cd)
{
    const struct emx_host *h = cd->host;
    char url[2048];
    size_t len = 0;
    int rc;

    rc = append(url, sizeof(url), &len, "%s%s", cd->base, cd->path_query);
    /* Never an index below 1: 0 would make every query return at once. */
    if (rc == 0 && cd->index >= 1)
        rc = append(url, sizeof(url), &len, "&index=%llu&wait=%llums",
                    (unsigned long long)cd->index, (unsigned long long)cd->wait_ms);
    if (rc < 0) {
        h->log(h, EMX_LOG_ERROR, "query URL longer than %zu bytes", sizeof(url));
        return rc;
    }

    CURL *e = curl_easy_init();
    if (!e)
        return -ENOMEM;
    cd->sent_index = cd->index;
    cd->body_len = 0;
    cd->too_large = false;
    cd->have_index_hdr = false;
    cd->index_hdr_bad = false;
    cd->errbuf[0] = '\0';
    /* Consul may hold a blocking query up to wait + wait/16. */
    uint64_t timeout = cd->timeout_ms + (cd->index >= 1 ? cd->wait_ms + cd->wait_ms / 16 : 0);

    CURLcode c = CURLE_OK;
#define SET(opt, val)                                                                              \
    if (c == CURLE_OK)                                                                             \
    c = curl_easy_setopt(e, opt, val)
    SET(CURLOPT_URL, url);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 0L); /* a redirect would carry the token elsewhere */
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_VERBOSE, 0L); /* verbose output would print the token header */
    SET(CURLOPT_HTTPHEADER, cd->headers);
    SET(CURLOPT_USERAGENT, "edgemux-discovery-consul/0.1.0");
    SET(CURLOPT_ACCEPT_ENCODING, "");
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, cd);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, cd);
    SET(CURLOPT_ERRORBUFFER, cd->errbuf);
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)cd->timeout_ms);
    SET(CURLOPT_TIMEOUT_MS, (long)timeout);
    SET(CURLOPT_SSL_VERIFYPEER, 1L);
    SET(CURLOPT_SSL_VERIFYHOST, 2L);
    if (cd->ca_file)
        SET(CURLOPT_CAINFO, cd->ca_file);
    SET(CURLOPT_PRIVATE, cd);
#undef SET
    if (c != CURLE_OK) {
        h->log(h, EMX_LOG_ERROR, "cannot set up the query: %s", curl_easy_strerror(c));
        curl_easy_cleanup(e);
        return -EINVAL;
    }
    CURLMcode mc = curl_multi_add_handle(cd->multi, e);
    if (mc != CURLM_OK) {
        h->log(h, EMX_LOG_ERROR, "cannot start the query: %s", curl_multi_strerror(mc));
        curl_easy_cleanup(e);
        return -ENOMEM;
    }
    cd->easy = e;
    cd->started_ms = h->now_ms(h);
    uv_timer_start(&cd->next, on_next, timeout + 5000, 0);
    h->log(h, EMX_LOG_DEBUG, "GET %s", url);
    return 0;
}

static void abort_query(struct consul_disc *cd, const char *what)
{
    char reason[REASON_MAX];
    snprintf(reason, sizeof(reason), "%s: %s", cd->base, what);
    end_query(cd);
    report_failure(cd, reason);
}

static void on_next(uv_timer_t *t)
{
    struct consul_disc *cd = t->data;
    if (cd->stopped)
        return;
    if (cd->easy) {
        /* The watchdog set by start_query: libcurl neither answered nor
         * timed out, so its events were lost; never wait forever. */
        abort_query(cd, "query stuck past its timeout; abandoned");
        return;
    }
    int rc = start_query(cd);
    if (rc < 0) {
        char reason[REASON_MAX];
        snprintf(reason, sizeof(reason), "%s: cannot start a query: %s", cd->base, uv_strerror(rc));
        report_failure(cd, reason);
    }
}

static void schedule(struct consul_disc *cd, uint64_t delay_ms)
{
    if (!cd->stopped)
        uv_timer_start(&cd->next, on_next, delay_ms, 0);
}

/* ---- libcurl on the loop ---- */

static void on_close(uv_handle_t *handle)
{
    struct consul_disc *cd = handle->data;
    cd->open_handles--;
    maybe_free(cd);
}

static void on_sock_close(uv_handle_t *handle)
{
    struct sock *s = handle->data;
    struct consul_disc *cd = s->cd;
    free(s);
    cd->open_handles--;
    maybe_free(cd);
}

static void sock_close(struct consul_disc *cd, struct sock *s)
{
    for (struct sock **p = &cd->socks; *p; p = &(*p)->next) {
        if (*p == s) {
            *p = s->next;
            break;
        }
    }
    uv_close((uv_handle_t *)&s->poll, on_sock_close);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct sock *s = p->data;
    struct consul_disc *cd = s->cd;
    int flags = 0, running;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    CURLMcode mc = curl_multi_socket_action(cd->multi, s->fd, flags, &running);
    if (mc != CURLM_OK && cd->easy)
        abort_query(cd, curl_multi_strerror(mc));
    else
        check_done(cd);
}

static int on_curl_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct consul_disc *cd = userp;
    struct sock *s = socketp;
    (void)e;

    if (what == CURL_POLL_REMOVE) {
        if (s) {
            curl_multi_assign(cd->multi, fd, NULL);
            sock_close(cd, s);
        }
        return 0;
    }
    if (!s) {
        if (cd->stopped)
            return -1;
        s = calloc(1, sizeof(*s));
        if (!s)
            return -1;
        int rc = uv_poll_init_socket(cd->host->loop, &s->poll, fd);
        if (rc < 0) {
            cd->host->log(cd->host, EMX_LOG_ERROR, "cannot watch socket %d: %s", (int)fd,
                          uv_strerror(rc));
            free(s);
            return -1;
        }
        s->cd = cd;
        s->fd = fd;
        s->poll.data = s;
        s->next = cd->socks;
        cd->socks = s;
        cd->open_handles++;
        curl_multi_assign(cd->multi, fd, s);
    }
    int events = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        events |= UV_READABLE;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        events |= UV_WRITABLE;
    int rc = uv_poll_start(&s->poll, events, on_poll);
    if (rc < 0)
        cd->host->log(cd->host, EMX_LOG_ERROR, "cannot watch socket %d: %s", (int)fd,
                      uv_strerror(rc));
    return rc < 0 ? -1 : 0;
}

static void on_curl_timer_fire(uv_timer_t *t)
{
    struct consul_disc *cd = t->data;
    int running;
    CURLMcode mc = curl_multi_socket_action(cd->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    if (mc != CURLM_OK && cd->easy)
        abort_query(cd, curl_multi_strerror(mc));
    else
        check_done(cd);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    struct consul_disc *cd = userp;
    (void)multi;
    if (uv_is_closing((uv_handle_t *)&cd->curl_timer))
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&cd->curl_timer);
    else /* 0 too goes through the loop: curl must not be re-entered here */
        uv_timer_start(&cd->curl_timer, on_curl_timer_fire, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---- life cycle ---- */

static void wipe_headers(struct consul_disc *cd)
{
    for (struct curl_slist *s = cd->headers; s; s = s->next)
        explicit_bzero(s->data, strlen(s->data));
    curl_slist_free_all(cd->headers);
    cd->headers = NULL;
}

static void disc_free(struct consul_disc *cd)
{
    wipe_headers(cd);
    emx_instset_free(&cd->good);
    free(cd->body);
    free(cd->base);
    free(cd->path_query);
    free(cd->ca_file);
    free(cd->tag);
    free(cd->tls_meta);
    free(cd->priority_meta);
    free(cd);
}

/* Memory goes only once destroy was called and libuv let go of every handle. */
static void maybe_free(struct consul_disc *cd)
{
    if (cd->destroyed && cd->open_handles == 0)
        disc_free(cd);
}

static void close_all(struct consul_disc *cd)
{
    end_query(cd);
    if (cd->multi) {
        /* Closes cached connections; their sockets come back as REMOVE. */
        curl_multi_cleanup(cd->multi);
        cd->multi = NULL;
    }
    while (cd->socks)
        sock_close(cd, cd->socks);
    if (cd->started) {
        if (!uv_is_closing((uv_handle_t *)&cd->curl_timer))
            uv_close((uv_handle_t *)&cd->curl_timer, on_close);
        if (!uv_is_closing((uv_handle_t *)&cd->next))
            uv_close((uv_handle_t *)&cd->next, on_close);
    }
}

/* Reads the token: a small file read once at create, like the config. */
static int read_token_file(const struct emx_host *h, const char *path, char *out, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        h->log(h, EMX_LOG_ERROR, "token_file %s: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        h->log(h, EMX_LOG_ERROR, "token_file %s: not a regular file", path);
        return -EINVAL;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO))
        h->log(h, EMX_LOG_WARN, "token_file %s: readable by group or others", path);
    ssize_t n = read(fd, out, size - 1);
    close(fd);
    if (n < 0) {
        int e = errno;
        h->log(h, EMX_LOG_ERROR, "token_file %s: %s", path, strerror(e));
        return -e;
    }
    if ((size_t)n == size - 1) {
        explicit_bzero(out, size);
        h->log(h, EMX_LOG_ERROR, "token_file %s: longer than %zu bytes", path, size - 2);
        return -EINVAL;
    }
    out[n] = '\0';
    return 0;
}

/* A token goes into a header line: printable ASCII only, no blanks, so it
 * cannot split the header. Trailing newline and blanks are trimmed. */
static int check_token(const struct emx_host *h, char *tok, const char *from)
{
    size_t len = strlen(tok);
    while (len > 0 && isspace((unsigned char)tok[len - 1]))
        tok[--len] = '\0';
    size_t start = 0;
    while (start < len && isspace((unsigned char)tok[start]))
        start++;
    memmove(tok, tok + start, len - start + 1);
    len -= start;
    if (len == 0) {
        h->log(h, EMX_LOG_ERROR, "%s: the token is empty", from);
        return -EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        if (tok[i] <= 0x20 || tok[i] >= 0x7f) {
            h->log(h, EMX_LOG_ERROR, "%s: the token holds a character that cannot go in a header",
                   from);
            return -EINVAL;
        }
    }
    return 0;
}

static int build_headers(const struct emx_host *h, const struct consul_config *cfg,
                         struct curl_slist **out)
{
    char tok[TOKEN_MAX + 2];
    char line[TOKEN_MAX + 32];
    const char *from = NULL;
    int rc = 0;

    *out = NULL;
    tok[0] = '\0';
    if (cfg->token_file && cfg->token_file[0]) {
        from = "token_file";
        rc = read_token_file(h, cfg->token_file, tok, sizeof(tok));
    } else {
        const char *env = getenv("CONSUL_HTTP_TOKEN");
        const char *env_file = getenv("CONSUL_HTTP_TOKEN_FILE");
        if (env && env[0]) {
            from = "CONSUL_HTTP_TOKEN";
            if (strlen(env) > TOKEN_MAX) {
                h->log(h, EMX_LOG_ERROR, "CONSUL_HTTP_TOKEN: longer than %d bytes", TOKEN_MAX);
                rc = -EINVAL;
            } else {
                snprintf(tok, sizeof(tok), "%s", env);
            }
        } else if (env_file && env_file[0]) {
            from = "CONSUL_HTTP_TOKEN_FILE";
            rc = read_token_file(h, env_file, tok, sizeof(tok));
        }
    }
    if (rc == 0 && from)
        rc = check_token(h, tok, from);
    struct curl_slist *list = curl_slist_append(NULL, "Accept: application/json");
    if (rc == 0 && !list)
        rc = -ENOMEM;
    if (rc == 0 && from) {
        snprintf(line, sizeof(line), "X-Consul-Token: %s", tok);
        struct curl_slist *l2 = curl_slist_append(list, line);
        explicit_bzero(line, sizeof(line));
        if (!l2)
            rc = -ENOMEM;
        else
            list = l2;
    }
    explicit_bzero(tok, sizeof(tok));
    if (rc < 0) {
        for (struct curl_slist *s = list; s; s = s->next)
            explicit_bzero(s->data, strlen(s->data));
        curl_slist_free_all(list);
        return rc;
    }
    h->log(h, EMX_LOG_DEBUG, "ACL token: %s", from ? from : "none");
    *out = list;
    return 0;
}

static int build_path(const struct emx_host *h, const struct consul_config *cfg, CURL *e,
                      char **out)
{
    char buf[1536];
    size_t len = 0;
    int rc;
    char *svc = curl_easy_escape(e, cfg->service, 0);
    char *tag = cfg->tag && cfg->tag[0] ? curl_easy_escape(e, cfg->tag, 0) : NULL;
    char *dc =
        cfg->datacenter && cfg->datacenter[0] ? curl_easy_escape(e, cfg->datacenter, 0) : NULL;
    rc = (!svc || (cfg->tag && cfg->tag[0] && !tag) ||
          (cfg->datacenter && cfg->datacenter[0] && !dc))
             ? -ENOMEM
             : 0;
    if (rc == 0)
        rc = append(buf, sizeof(buf), &len, "/v1/health/service/%s?passing", svc);
    if (rc == 0 && tag)
        rc = append(buf, sizeof(buf), &len, "&tag=%s", tag);
    if (rc == 0 && dc)
        rc = append(buf, sizeof(buf), &len, "&dc=%s", dc);
    curl_free(svc);
    curl_free(tag);
    curl_free(dc);
    if (rc == -ENAMETOOLONG)
        h->log(h, EMX_LOG_ERROR, "service, tag and datacenter make a URL too long");
    if (rc == 0 && !(*out = dup_n(buf, len)))
        rc = -ENOMEM;
    return rc;
}

static bool valid_name(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

static int check_config(const struct emx_host *h, const struct consul_config *cfg)
{
    const char *a = cfg->address ? cfg->address : DEFAULT_ADDRESS;
    if (strncmp(a, "http://", 7) != 0 && strncmp(a, "https://", 8) != 0) {
        h->log(h, EMX_LOG_ERROR, "address: expected http://host:port or https://host:port");
        return -EINVAL;
    }
    if (strlen(a) > 512 || !valid_name(a) || strchr(a, '?') || strchr(a, '#') || strchr(a, ' ')) {
        h->log(h, EMX_LOG_ERROR, "address: not a plain URL base");
        return -EINVAL;
    }
    if (!cfg->service || !cfg->service[0] || strlen(cfg->service) > 255 ||
        !valid_name(cfg->service)) {
        h->log(h, EMX_LOG_ERROR, "service: a Consul service name is required");
        return -EINVAL;
    }
    if ((cfg->tag && (strlen(cfg->tag) > 255 || !valid_name(cfg->tag))) ||
        (cfg->datacenter && (strlen(cfg->datacenter) > 255 || !valid_name(cfg->datacenter)))) {
        h->log(h, EMX_LOG_ERROR, "tag, datacenter: at most 255 printable characters");
        return -EINVAL;
    }
    if (cfg->wait_ms < 1000 || cfg->wait_ms > WAIT_MAX_MS) {
        h->log(h, EMX_LOG_ERROR, "wait: expected 1s..10m, found %llu ms",
               (unsigned long long)cfg->wait_ms);
        return -EINVAL;
    }
    if (cfg->backoff_min_ms < 1 || cfg->backoff_max_ms < cfg->backoff_min_ms) {
        h->log(h, EMX_LOG_ERROR, "backoff_min must be at least 1ms and at most backoff_max");
        return -EINVAL;
    }
    if (cfg->timeout_ms < 100 || cfg->timeout_ms > 600000) {
        h->log(h, EMX_LOG_ERROR, "timeout: expected 100ms..10m");
        return -EINVAL;
    }
    if (cfg->max_size < 1024 || cfg->max_size > MAX_SIZE_LIMIT) {
        h->log(h, EMX_LOG_ERROR, "max_size: expected 1KiB..256MiB");
        return -EINVAL;
    }
    return 0;
}

static int consul_create(const struct emx_host *host, const void *config, void **instance)
{
    const struct consul_config *cfg = config;
    struct consul_disc *cd = NULL;
    int rc;

    *instance = NULL;
    if (!EMX_HOST_HAS(host, discovery_failed))
        return -ENOTSUP;
    if ((rc = check_config(host, cfg)) < 0)
        return rc;
    /* Sets up libcurl's globals once per process; safe to repeat. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        host->log(host, EMX_LOG_ERROR, "cannot initialise libcurl");
        return -ENOMEM;
    }
    const curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
    if (!(vi->features & CURL_VERSION_ASYNCHDNS))
        host->log(host, EMX_LOG_WARN,
                  "libcurl resolves names synchronously: use an IP address in address");
    if (!(cd = calloc(1, sizeof(*cd))))
        return -ENOMEM;
    cd->host = host;
    const char *a = cfg->address ? cfg->address : DEFAULT_ADDRESS;
    size_t alen = strlen(a);
    while (alen > 0 && a[alen - 1] == '/')
        alen--;
    cd->base = dup_n(a, alen);
    cd->ca_file = dup_opt(cfg->ca_file && cfg->ca_file[0] ? cfg->ca_file : NULL);
    cd->tag = dup_opt(cfg->tag && cfg->tag[0] ? cfg->tag : NULL);
    cd->tls_meta = dup_opt(cfg->tls_meta);
    cd->priority_meta = dup_opt(cfg->priority_meta);
    if (!cd->base || (cfg->ca_file && cfg->ca_file[0] && !cd->ca_file) ||
        (cfg->tag && cfg->tag[0] && !cd->tag) || (cfg->tls_meta && !cd->tls_meta) ||
        (cfg->priority_meta && !cd->priority_meta)) {
        rc = -ENOMEM;
        goto fail;
    }
    cd->filter = (struct consul_filter){cd->tag, cd->priority_meta, cd->tls_meta, cfg->tls};
    cd->wait_ms = cfg->wait_ms;
    cd->min_interval_ms = cfg->min_interval_ms;
    cd->backoff_min_ms = cfg->backoff_min_ms;
    cd->backoff_max_ms = cfg->backoff_max_ms;
    cd->timeout_ms = cfg->timeout_ms;
    cd->max_size = (size_t)cfg->max_size;
    cd->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)cd;
    if (!cd->rng)
        cd->rng = 0x9E3779B97F4A7C15ull;

    CURL *e = curl_easy_init();
    if (!e) {
        rc = -ENOMEM;
        goto fail;
    }
    rc = build_path(host, cfg, e, &cd->path_query);
    curl_easy_cleanup(e);
    if (rc < 0)
        goto fail;
    if ((rc = build_headers(host, cfg, &cd->headers)) < 0)
        goto fail;
    *instance = cd;
    return 0;
fail:
    disc_free(cd);
    return rc;
}

static int consul_start(void *instance)
{
    struct consul_disc *cd = instance;
    uv_loop_t *loop = cd->host->loop;
    int rc;

    if ((rc = uv_timer_init(loop, &cd->curl_timer)) < 0)
        goto fail;
    cd->curl_timer.data = cd;
    cd->open_handles++;
    if ((rc = uv_timer_init(loop, &cd->next)) < 0) {
        uv_close((uv_handle_t *)&cd->curl_timer, on_close);
        goto fail;
    }
    cd->next.data = cd;
    cd->open_handles++;
    cd->started = true;

    if (!(cd->multi = curl_multi_init())) {
        rc = -ENOMEM;
        goto fail;
    }
    curl_multi_setopt(cd->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(cd->multi, CURLMOPT_SOCKETDATA, cd);
    curl_multi_setopt(cd->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(cd->multi, CURLMOPT_TIMERDATA, cd);
    curl_multi_setopt(cd->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, 2L);

    cd->host->log(cd->host, EMX_LOG_INFO, "watching %s%s (wait %llu ms, min_interval %llu ms)",
                  cd->base, cd->path_query, (unsigned long long)cd->wait_ms,
                  (unsigned long long)cd->min_interval_ms);
    schedule(cd, 0);
    return 0;
fail:
    /* destroy closes what was initialised. */
    cd->host->log(cd->host, EMX_LOG_ERROR, "cannot start: %s", uv_strerror(rc));
    return rc;
}

static void consul_stop(void *instance)
{
    struct consul_disc *cd = instance;
    cd->stopped = true;
    close_all(cd);
}

static void consul_destroy(void *instance)
{
    struct consul_disc *cd = instance;
    if (!cd)
        return;
    cd->stopped = true;
    cd->destroyed = true;
    close_all(cd);
    maybe_free(cd);
}

/* A new address, service or token means a new index and baseline:
 * recreating the instance is simpler and as cheap. */
static int consul_reconfigure(void *instance, const void *config)
{
    (void)instance;
    (void)config;
    return -ENOTSUP;
}

#define OPT(name_, alias_, type_, def_, required_, field_, help_)                                  \
    {                                                                                              \
        (name_), (alias_), (type_), (def_), (required_), offsetof(struct consul_config, field_),   \
            (help_)                                                                                \
    }

static const struct emx_option consul_options[] = {
    OPT("address", NULL, EMX_OPT_STRING, DEFAULT_ADDRESS, false, address,
        "Consul's HTTP API, http://host:port or https://host:port"),
    OPT("service", NULL, EMX_OPT_STRING, NULL, true, service,
        "the Consul service whose passing instances are the platform instances"),
    OPT("tag", NULL, EMX_OPT_STRING, NULL, false, tag, "only instances carrying this tag"),
    OPT("datacenter", "dc", EMX_OPT_STRING, NULL, false, datacenter,
        "ask this datacenter instead of the agent's own"),
    OPT("tls", NULL, EMX_OPT_BOOL, "false", false, tls,
        "wss to the instances found (Service.Meta[tls_meta] overrides per instance)"),
    OPT("tls_meta", NULL, EMX_OPT_STRING, "edgemux-tls", false, tls_meta,
        "Service.Meta key whose \"true\"/\"false\" overrides tls for one instance"),
    OPT("priority_meta", NULL, EMX_OPT_STRING, "edgemux-priority", false, priority_meta,
        "Service.Meta key holding the instance's priority (lower is preferred; default 0)"),
    OPT("wait", NULL, EMX_OPT_DURATION, "5m", false, wait_ms,
        "how long Consul may hold a blocking query (1s..10m)"),
    OPT("token_file", NULL, EMX_OPT_STRING, NULL, false, token_file,
        "file holding the ACL token (default: CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE)"),
    OPT("ca_file", NULL, EMX_OPT_STRING, NULL, false, ca_file,
        "PEM CA bundle to verify an https address (default: the system store)"),
    OPT("min_interval", NULL, EMX_OPT_DURATION, "1s", false, min_interval_ms,
        "least time between the starts of two queries"),
    OPT("backoff_min", NULL, EMX_OPT_DURATION, "1s", false, backoff_min_ms,
        "first retry delay after a failure (doubles, jittered)"),
    OPT("backoff_max", NULL, EMX_OPT_DURATION, "30s", false, backoff_max_ms,
        "longest retry delay after failures"),
    OPT("timeout", NULL, EMX_OPT_DURATION, "10s", false, timeout_ms,
        "connect timeout, and the time allowed beyond wait for an answer"),
    OPT("max_size", NULL, EMX_OPT_SIZE, "8MiB", false, max_size,
        "refuse an answer larger than this"),
    EMX_OPTION_END,
};

EMX_PLUGIN_EXPORT const struct emx_discovery_plugin emx_discovery_plugin = {
    .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_DISCOVERY, struct emx_discovery_plugin, "consul", "0.1.0"),
    .options = consul_options,
    .config_size = sizeof(struct consul_config),
    .create = consul_create,
    .start = consul_start,
    .stop = consul_stop,
    .destroy = consul_destroy,
    .reconfigure = consul_reconfigure,
};
