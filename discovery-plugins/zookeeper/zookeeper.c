/* emx-discovery-zookeeper: platform instances registered in ZooKeeper, the
 * registry a ThingWorx HA cluster already runs (Curator service discovery:
 * one ephemeral znode per platform under <base_path>/<service>).
 *
 * Threads. libzookeeper-mt runs its own I/O and completion threads and calls
 * our watchers, completions and log callback there. Those only copy what
 * they got into an event and hand it to the loop with host->post; every
 * state change and every host call happens on the loop thread. Creating a
 * handle (it resolves host names) and zookeeper_close (it waits for the
 * server) block, so both run on libuv's thread pool.
 *
 * One "link" per ZooKeeper handle. A session that expires gets a new link;
 * the old one is retired (no more posts from its threads) and closed on the
 * pool. Events of a retired link are dropped on arrival.
 *
 * Snapshots. A child watch on the service node and a data watch on each
 * child trigger a round: list the children, read every child's data, and
 * report the whole set once all reads have answered. Changes seen while a
 * round is running start another round when it ends.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zookeeper/zookeeper.h>

#include "edgemux/discovery.h"
#include "instset.h"
#include "zk_instance.h"

#define PATH_MAX_LEN    1024
#define RETRY_MS        2000 /* after a handle could not be created */
#define ROUND_RETRY_MS  1000 /* after a listing or read failed on a live session */
#define ZKLOG_WINDOW_MS 60000
#define ZKLOG_PER_WIN   20 /* libzookeeper lines per window; it repeats itself in outages */
#define ZK_LOG_SLOTS    16

struct zk_config {
    const char *connection_string;
    const char *base_path;
    const char *service;
    const char *tls;
    uint64_t session_timeout_ms;
    const char *digest;
};

struct zk_disc;

/* One ZooKeeper handle and everything its threads may touch. */
struct zk_link {
    pthread_mutex_t mu;
    unsigned refs; /* under mu: the owner, the open handle, each event in flight */
    bool live;     /* under mu: its threads may post */
    const struct emx_host *host;
    uv_loop_t *loop;
    int slot; /* log trampoline, or -1 */

    /* Loop thread only. */
    struct zk_disc *zd; /* NULL once retired */
    zhandle_t *zh;      /* set when the pool thread has created it */
    int state;          /* last session state seen, 0 before any */
};

enum ev_kind { EV_SESSION = 1, EV_WATCH, EV_CHILDREN, EV_DATA, EV_EXISTS, EV_LOG };

/* Made on the loop for a call (or on a zk thread for a watch, a session
 * change or a log line), filled on a zk thread, handled on the loop. */
struct event {
    struct zk_link *link; /* holds a reference */
    enum ev_kind kind;
    int state; /* EV_SESSION */
    int rc;    /* completions */
    uint64_t round;
    size_t index;             /* EV_DATA: which child */
    char **names;             /* EV_CHILDREN */
    size_t count;             /* EV_CHILDREN */
    char *data;               /* EV_DATA: node data (NULL: none); EV_LOG: the line */
    size_t len;               /* EV_DATA */
    enum emx_log_level level; /* EV_LOG */
};

/* One listing and the reads of its children. */
struct round {
    uint64_t id;
    size_t count, pending;
    char **names;
    struct zk_child *kids;
    char **datas;
    bool broken; /* a read failed for a reason other than the node being gone */
    int broken_rc;
};

struct job {
    uv_work_t req;
    struct zk_link *link;
    zhandle_t *zh;
    int err;     /* errno of a failed zookeeper_init2 */
    int auth_rc; /* zoo_add_auth's answer */
    char *conn;
    char *digest;
    int timeout_ms;
    log_callback_fn log_fn;
};

/* Warnings about records, by text: one already given in the last round is
 * logged at debug, so a bad node is warned about once per change. */
#define WARNED_MAX 1024
struct warned {
    char **v;
    size_t n;
};

static bool warned_has(const struct warned *w, const char *msg)
{
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->v[i], msg) == 0)
            return true;
    return false;
}

static void warned_add(struct warned *w, const char *msg)
{
    if (w->n >= WARNED_MAX || warned_has(w, msg))
        return;
    if ((w->n & (w->n - 1)) == 0) { /* 0, 1, 2, 4 ...: grow to the next power of two */
        char **v = realloc(w->v, (w->n ? 2 * w->n : 1) * sizeof(*v));
        if (!v)
            return;
        w->v = v;
    }
    char *d = strdup(msg);
    if (d)
        w->v[w->n++] = d;
}

static void warned_clear(struct warned *w)
{
    for (size_t i = 0; i < w->n; i++)
        free(w->v[i]);
    free(w->v);
    w->v = NULL;
    w->n = 0;
}

struct zk_disc {
    const struct emx_host *host;
    char *conn;
    char *path; /* <base_path>/<service> */
    char *digest;
    bool tls;
    int timeout_ms;

    uv_timer_t connect_timer; /* no session comes up, or a lost one does not come back */
    uv_timer_t retry_timer;   /* a new handle after one could not be made */
    uv_timer_t round_timer;   /* a round again after a read failed */
    uv_timer_t watchdog;      /* a round that gets no answer is read again */
    unsigned open_handles;

    struct zk_link *link; /* current handle, or NULL */
    bool connected;
    bool link_was_up;                  /* the current handle had a session once */
    int session_ms;                    /* the session timeout the server granted */
    struct warned warned, warned_next; /* skip warnings of the last round, this one */
    bool stopped, destroyed;
    uint64_t round_seq;
    uint64_t listing; /* id of the listing in flight, 0: none */
    struct round *round;
    bool again; /* a change was seen while a round ran */
    bool parent_missing;

    struct emx_instset good;
    bool have_good;
    char *last_failure;

    uint64_t zklog_window;
    unsigned zklog_count, zklog_dropped;
};

static void request_round(struct zk_disc *zd);
static int new_link(struct zk_disc *zd);
static void maybe_free(struct zk_disc *zd);

static char *dup_str(const char *s)
{
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d)
        memcpy(d, s, n + 1);
    return d;
}

static void free_secret(char *s)
{
    if (s) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

/* ---- links and events (any thread) ---- */

static void link_ref(struct zk_link *l)
{
    pthread_mutex_lock(&l->mu);
    l->refs++;
    pthread_mutex_unlock(&l->mu);
}

static void link_unref(struct zk_link *l)
{
    pthread_mutex_lock(&l->mu);
    bool last = --l->refs == 0;
    pthread_mutex_unlock(&l->mu);
    if (last) {
        pthread_mutex_destroy(&l->mu);
        free(l);
    }
}

static void event_free(struct event *ev)
{
    for (size_t i = 0; ev->names && i < ev->count; i++)
        free(ev->names[i]);
    free(ev->names);
    free(ev->data);
    free(ev);
}

static void on_event(void *arg);

/* Hands ev (which holds a link reference) to the loop, or drops it when the
 * link was retired: after stop nothing may reach the host. */
static void post_event(struct event *ev)
{
    struct zk_link *l = ev->link;
    pthread_mutex_lock(&l->mu);
    if (l->live && l->host->post(l->host, on_event, ev) == 0) {
        pthread_mutex_unlock(&l->mu);
        return;
    }
    pthread_mutex_unlock(&l->mu);
    event_free(ev);
    link_unref(l);
}

static struct event *event_new(struct zk_link *l, enum ev_kind kind)
{
    struct event *ev = calloc(1, sizeof(*ev));
    if (!ev)
        return NULL;
    ev->link = l;
    ev->kind = kind;
    link_ref(l);
    return ev;
}

/* ---- libzookeeper's threads ---- */

/* The handle's watcher: only session changes matter here. */
static void on_session_watch(zhandle_t *zh, int type, int state, const char *path, void *ctx)
{
    (void)zh;
    (void)path;
    if (type != ZOO_SESSION_EVENT)
        return;
    struct event *ev = event_new(ctx, EV_SESSION);
    if (!ev)
        return;
    ev->state = state;
    post_event(ev);
}

/* Child, data and existence watches: any change means a new round. Session
 * changes also reach these watchers; the handle's watcher handles them. */
static void on_node_watch(zhandle_t *zh, int type, int state, const char *path, void *ctx)
{
    (void)zh;
    (void)state;
    (void)path;
    if (type == ZOO_SESSION_EVENT)
        return;
    struct event *ev = event_new(ctx, EV_WATCH);
    if (ev)
        post_event(ev);
}

static void on_children(int rc, const struct String_vector *strings, const void *data)
{
    struct event *ev = (struct event *)data;
    ev->rc = rc;
    if (rc == ZOK && strings && strings->count > 0) {
        ev->names = calloc((size_t)strings->count, sizeof(*ev->names));
        if (!ev->names)
            ev->rc = ZSYSTEMERROR;
        for (int32_t i = 0; ev->names && i < strings->count; i++) {
            if (!(ev->names[i] = dup_str(strings->data[i]))) {
                ev->rc = ZSYSTEMERROR;
                break;
            }
            ev->count++;
        }
    }
    post_event(ev);
}

static void on_data(int rc, const char *value, int value_len, const struct Stat *stat,
                    const void *data)
{
    struct event *ev = (struct event *)data;
    (void)stat;
    ev->rc = rc;
    if (rc == ZOK && value && value_len > 0) {
        ev->data = malloc((size_t)value_len + 1);
        if (ev->data) {
            memcpy(ev->data, value, (size_t)value_len);
            ev->data[value_len] = '\0';
            ev->len = (size_t)value_len;
        } else {
            ev->rc = ZSYSTEMERROR;
        }
    }
    post_event(ev);
}

static void on_exists(int rc, const struct Stat *stat, const void *data)
{
    struct event *ev = (struct event *)data;
    (void)stat;
    ev->rc = rc;
    post_event(ev);
}

/* libzookeeper's log callback takes no context, so each handle gets one of
 * a few trampolines that know their slot. Lock order: slots_mu, then a
 * link's mu. */
static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static struct zk_link *slots[ZK_LOG_SLOTS];

/* "<time>:<pid>(0x<tid>):ZOO_WARN@<function>@<line>: <message>" */
static void zk_log_to(int slot, const char *msg)
{
    enum emx_log_level level = EMX_LOG_DEBUG;
    const char *p = strstr(msg, ":ZOO_");
    if (p) {
        if (strncmp(p + 5, "ERROR@", 6) == 0)
            level = EMX_LOG_WARN; /* its errors are ours to judge; an outage repeats them */
        else if (strncmp(p + 5, "WARN@", 5) == 0)
            level = EMX_LOG_WARN;
        else if (strncmp(p + 5, "INFO@", 5) == 0)
            level = EMX_LOG_INFO;
        const char *text = strstr(p, ": ");
        msg = text ? text + 2 : p + 1;
    }
    pthread_mutex_lock(&slots_mu);
    struct zk_link *l = slots[slot];
    if (l) {
        struct event *ev = event_new(l, EV_LOG);
        if (ev && (ev->data = dup_str(msg))) {
            ev->level = level;
            post_event(ev);
        } else if (ev) {
            event_free(ev);
            link_unref(l);
        }
    }
    pthread_mutex_unlock(&slots_mu);
}

#define SLOT_FN(n)                                                                                 \
    static void log_slot_##n(const char *m)                                                        \
    {                                                                                              \
        zk_log_to(n, m);                                                                           \
    }
SLOT_FN(0)
SLOT_FN(1)
SLOT_FN(2)
SLOT_FN(3)
SLOT_FN(4)
SLOT_FN(5)
SLOT_FN(6)
SLOT_FN(7)
SLOT_FN(8)
SLOT_FN(9)
SLOT_FN(10)
SLOT_FN(11)
SLOT_FN(12)
SLOT_FN(13)
SLOT_FN(14)
SLOT_FN(15)

static const log_callback_fn slot_fns[ZK_LOG_SLOTS] = {
    log_slot_0,  log_slot_1,  log_slot_2,  log_slot_3,  log_slot_4,  log_slot_5,
    log_slot_6,  log_slot_7,  log_slot_8,  log_slot_9,  log_slot_10, log_slot_11,
    log_slot_12, log_slot_13, log_slot_14, log_slot_15,
};

/* More handles at once than slots (many instances in one process): their
 * library lines are dropped rather than written to stderr. */
static void log_drop(const char *m)
{
    (void)m;
}

static int slot_claim(struct zk_link *l)
{
    int slot = -1;
    pthread_mutex_lock(&slots_mu);
    for (int i = 0; i < ZK_LOG_SLOTS && slot < 0; i++)
        if (!slots[i]) {
            slots[i] = l;
            slot = i;
        }
    pthread_mutex_unlock(&slots_mu);
    return slot;
}

static void slot_release(int slot)
{
    if (slot < 0)
        return;
    pthread_mutex_lock(&slots_mu);
    slots[slot] = NULL;
    pthread_mutex_unlock(&slots_mu);
}

/* ---- the thread pool: creating and closing handles ---- */

static void job_free(struct job *job)
{
    free(job->conn);
    free_secret(job->digest);
    free(job);
}

static void close_work(uv_work_t *req)
{
    struct job *job = req->data;
    zookeeper_close(job->zh);
}

static void close_done(uv_work_t *req, int status)
{
    struct job *job = req->data;
    (void)status;
    slot_release(job->link->slot);
    link_unref(job->link); /* the handle's reference */
    job_free(job);
}

/* Closes the link's handle on the pool; the handle's reference goes with it. */
static void queue_close(struct zk_link *l)
{
    struct job *job = calloc(1, sizeof(*job));
    if (!job)
        return; /* leaks the handle, but never blocks the loop */
    job->link = l;
    job->zh = l->zh;
    l->zh = NULL;
    job->req.data = job;
    if (uv_queue_work(l->loop, &job->req, close_work, close_done) < 0)
        free(job);
}

static void init_work(uv_work_t *req)
{
    struct job *job = req->data;
    job->zh = zookeeper_init2(job->conn, on_session_watch, job->timeout_ms, NULL, job->link, 0,
                              job->log_fn);
    if (!job->zh) {
        job->err = errno ? errno : EINVAL;
        return;
    }
    /* Queued now, sent once connected and again on every reconnect. */
    if (job->digest)
        job->auth_rc =
            zoo_add_auth(job->zh, "digest", job->digest, (int)strlen(job->digest), NULL, NULL);
}

/* ---- the loop thread ---- */

static void fail(struct zk_disc *zd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fail(struct zk_disc *zd, const char *fmt, ...)
{
    const struct emx_host *h = zd->host;
    char reason[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    if (zd->stopped)
        return;
    if (zd->last_failure && strcmp(zd->last_failure, reason) == 0) {
        h->log(h, EMX_LOG_DEBUG, "still failing: %s", reason);
        return;
    }
    h->log(h, EMX_LOG_WARN, "%s; keeping the last good set (%zu instance%s)", reason,
           zd->good.count, zd->good.count == 1 ? "" : "s");
    free(zd->last_failure);
    zd->last_failure = dup_str(reason);
    h->discovery_failed(h, reason);
}

/* Retires the current link: its threads post nothing more, its events still
 * queued are dropped on arrival, and its handle is closed on the pool. */
static void drop_link(struct zk_disc *zd)
{
    struct zk_link *l = zd->link;
    if (!l)
        return;
    zd->link = NULL;
    zd->connected = false;
    pthread_mutex_lock(&l->mu);
    l->live = false;
    pthread_mutex_unlock(&l->mu);
    l->zd = NULL;
    if (l->zh)
        queue_close(l); /* else the pool thread making it closes what it gets */
    link_unref(l);
}

static void abort_round(struct zk_disc *zd)
{
    struct round *r = zd->round;
    if (zd->watchdog.loop)
        uv_timer_stop(&zd->watchdog);
    zd->listing = 0;
    zd->again = false;
    if (!r)
        return;
    for (size_t i = 0; i < r->count; i++) {
        free(r->names[i]);
        free(r->datas[i]);
    }
    free(r->names);
    free(r->datas);
    free(r->kids);
    free(r);
    zd->round = NULL;
}

static void on_retry(uv_timer_t *t)
{
    struct zk_disc *zd = t->data;
    if (!zd->stopped && !zd->link && new_link(zd) < 0)
        uv_timer_start(&zd->retry_timer, on_retry, RETRY_MS, 0);
}

static void on_session(struct zk_disc *zd, int state);

static void init_done(uv_work_t *req, int status)
{
    struct job *job = req->data;
    struct zk_link *l = job->link;
    struct zk_disc *zd = l->zd; /* NULL once retired */
    zhandle_t *zh = job->zh;
    int err = job->err, auth_rc = job->auth_rc;
    (void)status;
    job_free(job);

    if (!zh) {
        slot_release(l->slot);
        l->slot = -1;
        link_unref(l); /* the handle's reference: there is no handle */
        if (zd) {
            fail(zd, "cannot create a ZooKeeper client for '%s': %s", zd->conn, strerror(err));
            drop_link(zd);
            uv_timer_start(&zd->retry_timer, on_retry, RETRY_MS, 0);
        }
        return;
    }
    l->zh = zh;
    if (!zd) {
        queue_close(l);
        return;
    }
    if (auth_rc != ZOK)
        zd->host->log(zd->host, EMX_LOG_ERROR, "cannot add the digest credentials: %s",
                      zerror(auth_rc));
    /* Session events may have arrived before the handle did. */
    if (l->state)
        on_session(zd, l->state);
}

/* The session is gone for good: report it, close the handle, open a new
 * session (the last good set stays until it has read the current one). */
static void renew_session(struct zk_disc *zd, const char *why)
{
    abort_round(zd);
    fail(zd, "%s", why);
    zd->host->log(zd->host, EMX_LOG_INFO, "opening a new ZooKeeper session");
    drop_link(zd);
    if (new_link(zd) < 0)
        uv_timer_start(&zd->retry_timer, on_retry, RETRY_MS, 0);
}

static void on_connect_timeout(uv_timer_t *t)
{
    struct zk_disc *zd = t->data;
    if (zd->connected || zd->stopped)
        return;
    if (!zd->link_was_up) {
        fail(zd, "no ZooKeeper session with '%s' after %d ms", zd->conn, zd->timeout_ms);
        return;
    }
    /* The server expires a session it has not heard from for its timeout,
     * but libzookeeper reports that only if a server lets it reconnect: one
     * back with older state (a rebuilt ensemble, a restored snapshot)
     * refuses the client for good and it stays "connecting". */
    char why[160];
    snprintf(why, sizeof(why),
             "ZooKeeper session not re-established within its timeout (%d ms): taken as expired",
             zd->session_ms);
    renew_session(zd, why);
}

/* A new link and its handle, made on the pool. */
static int new_link(struct zk_disc *zd)
{
    struct zk_link *l = calloc(1, sizeof(*l));
    struct job *job = calloc(1, sizeof(*job));
    if (!l || !job || pthread_mutex_init(&l->mu, NULL) != 0)
        goto nomem;
    l->refs = 2; /* the owner, and the handle being made */
    l->live = true;
    l->host = zd->host;
    l->loop = zd->host->loop;
    l->zd = zd;
    l->slot = slot_claim(l);
    job->link = l;
    job->timeout_ms = zd->timeout_ms;
    job->log_fn = l->slot >= 0 ? slot_fns[l->slot] : log_drop;
    job->conn = dup_str(zd->conn);
    if (!job->conn || (zd->digest && !(job->digest = dup_str(zd->digest)))) {
        slot_release(l->slot);
        pthread_mutex_destroy(&l->mu);
        goto nomem;
    }
    job->req.data = job;
    int rc = uv_queue_work(l->loop, &job->req, init_work, init_done);
    if (rc < 0) {
        zd->host->log(zd->host, EMX_LOG_ERROR, "cannot queue the ZooKeeper client: %s",
                      uv_strerror(rc));
        slot_release(l->slot);
        pthread_mutex_destroy(&l->mu);
        job_free(job);
        free(l);
        return rc;
    }
    zd->link = l;
    zd->connected = false;
    zd->link_was_up = false;
    uv_timer_start(&zd->connect_timer, on_connect_timeout, (uint64_t)zd->timeout_ms, 0);
    return 0;
nomem:
    if (job)
        job_free(job);
    free(l);
    zd->host->log(zd->host, EMX_LOG_ERROR, "out of memory creating the ZooKeeper client");
    return -ENOMEM;
}

static const char *state_name(int state)
{
    if (state == ZOO_CONNECTED_STATE)
        return "connected";
    if (state == ZOO_CONNECTING_STATE)
        return "connecting";
    if (state == ZOO_EXPIRED_SESSION_STATE)
        return "session expired";
    if (state == ZOO_AUTH_FAILED_STATE)
        return "authentication failed";
    if (state == ZOO_READONLY_STATE)
        return "read-only";
    return "other";
}

static void on_session(struct zk_disc *zd, int state)
{
    const struct emx_host *h = zd->host;
    zhandle_t *zh = zd->link->zh;

    h->log(h, EMX_LOG_DEBUG, "session state: %s", state_name(state));
    if (state == ZOO_CONNECTED_STATE || state == ZOO_READONLY_STATE) {
        if (zd->connected)
            return;
        zd->connected = true;
        zd->link_was_up = true;
        int granted = zoo_recv_timeout(zh);
        zd->session_ms = granted > 0 ? granted : zd->timeout_ms;
        uv_timer_stop(&zd->connect_timer);
        const clientid_t *cid = zoo_client_id(zh);
        h->log(h, zd->last_failure ? EMX_LOG_INFO : EMX_LOG_DEBUG,
               "connected to ZooKeeper, session 0x%" PRIx64 "%s; reading %s",
               cid ? (uint64_t)cid->client_id : 0,
               state == ZOO_READONLY_STATE ? " (read-only)" : "", zd->path);
        /* Changes made while we were away fire no watch we could trust:
         * read everything again. */
        abort_round(zd);
        request_round(zd);
    } else if (state == ZOO_CONNECTING_STATE) {
        if (!zd->connected)
            return;
        zd->connected = false;
        abort_round(zd);
        fail(zd, "connection to ZooKeeper lost");
        /* Back within the session timeout, or the session is taken as
         * expired (on_connect_timeout). */
        uv_timer_start(&zd->connect_timer, on_connect_timeout, (uint64_t)zd->session_ms, 0);
    } else if (state == ZOO_EXPIRED_SESSION_STATE || state == ZOO_AUTH_FAILED_STATE) {
        abort_round(zd);
        if (state == ZOO_EXPIRED_SESSION_STATE) {
            renew_session(zd, "ZooKeeper session expired");
        } else {
            fail(zd, "ZooKeeper refused the digest credentials");
            drop_link(zd);
            uv_timer_start(&zd->retry_timer, on_retry, RETRY_MS, 0);
        }
    }
}

/* ---- reporting ---- */

/* The record set in the shape the core takes. 0 or -ENOMEM. */
static int to_instset(const struct zk_set *set, struct emx_instset *out)
{
    for (size_t i = 0; i < set->count; i++) {
        const struct zk_instance *in = &set->items[i];
        if (emx_instset_add(out, in->id, in->host, in->port, in->tls, in->weight, in->priority,
                            in->metadata) < 0) {
            emx_instset_free(out);
            return -ENOMEM;
        }
    }
    return 0;
}

/* Takes the set. */
static void report_set(struct zk_disc *zd, struct zk_set *parsed)
{
    const struct emx_host *h = zd->host;
    struct emx_instset set = {NULL, 0, 0};
    int rc = to_instset(parsed, &set);
    size_t count = parsed->count;

    zk_set_free(parsed);
    if (rc < 0) {
        h->log(h, EMX_LOG_ERROR, "out of memory reporting %zu instances", count);
        return; /* the next change or reconnect tries again */
    }
    if (zd->have_good && !zd->last_failure && emx_instset_equal(&zd->good, &set)) {
        h->log(h, EMX_LOG_DEBUG, "%s: unchanged", zd->path);
        emx_instset_free(&set);
        return;
    }
    emx_instset_log_changes(h, zd->path, NULL, zd->have_good ? &zd->good : NULL, &set);
    emx_instset_report(h, &set);

    emx_instset_free(&zd->good);
    zd->good = set;
    zd->have_good = true;
    free(zd->last_failure);
    zd->last_failure = NULL;
}

/* A warning about one record or node: once per change (see struct warned). */
static void warn_record(struct zk_disc *zd, const char *msg)
{
    bool seen = warned_has(&zd->warned, msg);
    zd->host->log(zd->host, seen ? EMX_LOG_DEBUG : EMX_LOG_WARN, "%s", msg);
    warned_add(&zd->warned_next, msg);
}

static void log_skip(void *arg, const char *msg)
{
    struct zk_disc *zd = arg;
    char line[1200];
    snprintf(line, sizeof(line), "%s: skipped: %s", zd->path, msg);
    warn_record(zd, line);
}

static void on_round_timer(uv_timer_t *t)
{
    request_round(t->data);
}

/* A listing or read failed while the session may still be fine (a request
 * timed out, the server was not serving yet): try again shortly rather than
 * wait for a watch that may never fire. A dead session reconnects and reads
 * everything anyway. */
static void round_failed(struct zk_disc *zd, int rc)
{
    zd->host->log(zd->host, EMX_LOG_DEBUG, "reading %s failed (%s); again in %d ms", zd->path,
                  zerror(rc), ROUND_RETRY_MS);
    if (!zd->stopped)
        uv_timer_start(&zd->round_timer, on_round_timer, ROUND_RETRY_MS, 0);
}

static void finish_round(struct zk_disc *zd)
{
    struct round *r = zd->round;
    struct zk_set set;
    size_t bad = 0;
    char err[512];

    if (r->broken) {
        int rc = r->broken_rc;
        abort_round(zd);
        round_failed(zd, rc);
        return;
    }
    int rc = zk_build_set(r->kids, r->count, zd->tls, &set, &bad, log_skip, zd, err, sizeof(err));
    bool again = zd->again;
    abort_round(zd);
    /* This round's warnings are the ones not to repeat next round. */
    warned_clear(&zd->warned);
    zd->warned = zd->warned_next;
    zd->warned_next = (struct warned){NULL, 0};
    if (rc == -EINVAL)
        fail(zd, "%s: every instance record is invalid (%zu); first: %s", zd->path, bad, err);
    else if (rc < 0)
        zd->host->log(zd->host, EMX_LOG_ERROR, "out of memory building the instance set");
    else
        report_set(zd, &set);
    if (again)
        request_round(zd);
}

static struct event *call_new(struct zk_disc *zd, enum ev_kind kind, uint64_t round, size_t index)
{
    struct event *ev = event_new(zd->link, kind);
    if (ev) {
        ev->round = round;
        ev->index = index;
    }
    return ev;
}

/* A call that was not queued: its completion will never run. */
static void call_drop(struct event *ev)
{
    struct zk_link *l = ev->link;
    event_free(ev);
    link_unref(l);
}

static void watch_parent(struct zk_disc *zd)
{
    struct event *ev = call_new(zd, EV_EXISTS, 0, 0);
    if (!ev)
        return;
    int rc = zoo_awexists(zd->link->zh, zd->path, on_node_watch, zd->link, on_exists, ev);
    if (rc != ZOK) {
        call_drop(ev);
        zd->host->log(zd->host, EMX_LOG_WARN, "cannot watch %s for creation: %s", zd->path,
                      zerror(rc));
    }
}

/* A listing or a read that never answers would stall discovery silently;
 * libzookeeper promises every completion, but a round is cheap to redo. */
static void on_watchdog(uv_timer_t *t)
{
    struct zk_disc *zd = t->data;
    if (!zd->listing && !zd->round)
        return;
    zd->host->log(zd->host, EMX_LOG_WARN, "no answer reading %s within %d ms; reading again",
                  zd->path, zd->timeout_ms);
    abort_round(zd);
    request_round(zd);
}

static void request_round(struct zk_disc *zd)
{
    if (zd->stopped || !zd->connected || !zd->link || !zd->link->zh)
        return; /* the next session start reads everything */
    if (zd->listing || zd->round) {
        zd->again = true;
        return;
    }
    warned_clear(&zd->warned_next); /* what an aborted round warned about */
    uint64_t id = ++zd->round_seq;
    struct event *ev = call_new(zd, EV_CHILDREN, id, 0);
    if (!ev) {
        zd->host->log(zd->host, EMX_LOG_ERROR, "out of memory listing %s", zd->path);
        return;
    }
    int rc = zoo_awget_children(zd->link->zh, zd->path, on_node_watch, zd->link, on_children, ev);
    if (rc != ZOK) {
        call_drop(ev);
        /* A dead handle reports its state through the session watcher. */
        zd->host->log(zd->host, EMX_LOG_WARN, "cannot list %s: %s", zd->path, zerror(rc));
        round_failed(zd, rc);
        return;
    }
    zd->listing = id;
    uv_timer_start(&zd->watchdog, on_watchdog, (uint64_t)zd->timeout_ms, 0);
}

static bool transient(int rc)
{
    return rc == ZCONNECTIONLOSS || rc == ZOPERATIONTIMEOUT || rc == ZSESSIONEXPIRED ||
           rc == ZCLOSING || rc == ZINVALIDSTATE || rc == ZSESSIONMOVED;
}

static void on_listing(struct zk_disc *zd, struct event *ev)
{
    const struct emx_host *h = zd->host;
    if (ev->round != zd->listing)
        return; /* of a round given up on */
    zd->listing = 0;

    if (ev->rc == ZNONODE) {
        /* ThingWorx creates the service node when the first platform
         * registers: no node means no platform yet, an empty answer. */
        if (!zd->parent_missing)
            h->log(h, EMX_LOG_WARN, "%s does not exist: no platform has registered yet", zd->path);
        zd->parent_missing = true;
        watch_parent(zd);
        struct zk_set none = {NULL, 0};
        bool again = zd->again;
        abort_round(zd);
        report_set(zd, &none);
        if (again)
            request_round(zd);
        return;
    }
    if (ev->rc != ZOK) {
        abort_round(zd);
        if (ev->rc == ZNOAUTH)
            fail(zd, "not allowed to list %s (ZooKeeper ACL)", zd->path);
        else if (!transient(ev->rc))
            fail(zd, "listing %s: %s", zd->path, zerror(ev->rc));
        round_failed(zd, ev->rc);
        return;
    }
    if (zd->parent_missing)
        h->log(h, EMX_LOG_INFO, "%s exists now", zd->path);
    zd->parent_missing = false;

    struct round *r = calloc(1, sizeof(*r));
    if (r && ev->count) {
        r->names = ev->names;
        r->kids = calloc(ev->count, sizeof(*r->kids));
        r->datas = calloc(ev->count, sizeof(*r->datas));
        if (!r->kids || !r->datas) {
            free(r->kids);
            free(r->datas);
            free(r);
            r = NULL;
        } else {
            r->count = ev->count;
            ev->names = NULL;
            ev->count = 0;
        }
    }
    if (!r) {
        h->log(h, EMX_LOG_ERROR, "out of memory reading %s", zd->path);
        return;
    }
    r->id = ++zd->round_seq; /* reads of this round carry its id */
    zd->round = r;
    if (r->count == 0) {
        finish_round(zd);
        return;
    }
    char path[PATH_MAX_LEN];
    for (size_t i = 0; i < r->count; i++) {
        r->kids[i].name = r->names[i];
        int n = snprintf(path, sizeof(path), "%s/%s", zd->path, r->names[i]);
        struct event *cev =
            n > 0 && (size_t)n < sizeof(path) ? call_new(zd, EV_DATA, r->id, i) : NULL;
        int rc = cev ? zoo_awget(zd->link->zh, path, on_node_watch, zd->link, on_data, cev)
                     : ZSYSTEMERROR;
        if (rc != ZOK) {
            if (cev)
                call_drop(cev);
            h->log(h, EMX_LOG_WARN, "cannot read %s: %s", path, zerror(rc));
            r->broken = true;
            r->broken_rc = rc;
            break;
        }
        r->pending++;
    }
    if (r->broken && r->pending == 0)
        finish_round(zd);
    /* else: the reads in flight finish it */
}

static void on_read(struct zk_disc *zd, struct event *ev)
{
    struct round *r = zd->round;
    if (!r || ev->round != r->id || ev->index >= r->count)
        return;
    struct zk_child *kid = &r->kids[ev->index];
    if (ev->rc == ZOK) {
        r->datas[ev->index] = ev->data;
        kid->data = ev->data;
        kid->len = ev->len;
        kid->present = true;
        ev->data = NULL;
    } else if (ev->rc == ZNONODE) {
        /* Gone between the listing and the read: its watch starts a round. */
    } else if (ev->rc == ZNOAUTH) {
        char line[1200];
        snprintf(line, sizeof(line), "%s/%s: not allowed to read (ZooKeeper ACL); skipped",
                 zd->path, kid->name);
        warn_record(zd, line);
    } else {
        if (!transient(ev->rc))
            zd->host->log(zd->host, EMX_LOG_WARN, "reading %s/%s: %s", zd->path, kid->name,
                          zerror(ev->rc));
        r->broken = true;
        r->broken_rc = ev->rc;
    }
    if (--r->pending == 0)
        finish_round(zd);
}

/* libzookeeper's own lines, bounded: in an outage it logs every attempt. */
static void zk_log_line(struct zk_disc *zd, enum emx_log_level level, const char *text)
{
    const struct emx_host *h = zd->host;
    uint64_t now = h->now_ms(h);
    if (now - zd->zklog_window >= ZKLOG_WINDOW_MS) {
        if (zd->zklog_dropped)
            h->log(h, EMX_LOG_WARN, "libzookeeper: %u more lines not shown", zd->zklog_dropped);
        zd->zklog_window = now;
        zd->zklog_count = 0;
        zd->zklog_dropped = 0;
    }
    if (zd->zklog_count >= ZKLOG_PER_WIN) {
        zd->zklog_dropped++;
        return;
    }
    zd->zklog_count++;
    /* Library text: control characters replaced so it stays one line. */
    char buf[512];
    size_t i = 0;
    for (; text[i] && i < sizeof(buf) - 1; i++)
        buf[i] = ((unsigned char)text[i] < 0x20 || text[i] == 0x7f) ? ' ' : text[i];
    buf[i] = '\0';
    h->log(h, level, "libzookeeper: %s", buf);
}

static void on_event(void *arg)
{
    struct event *ev = arg;
    struct zk_link *l = ev->link;
    struct zk_disc *zd = l->zd; /* NULL: the link was retired */

    if (zd && ev->kind == EV_LOG)
        zk_log_line(zd, ev->level, ev->data);
    else if (zd && !zd->stopped) {
        switch (ev->kind) {
        case EV_SESSION:
            l->state = ev->state;
            if (l->zh)
                on_session(zd, ev->state);
            break;
        case EV_WATCH:
            request_round(zd);
            break;
        case EV_CHILDREN:
            on_listing(zd, ev);
            break;
        case EV_DATA:
            on_read(zd, ev);
            break;
        case EV_EXISTS:
            if (ev->rc == ZOK)
                request_round(zd); /* created between the listing and the watch */
            break;
        default:
            break;
        }
    }
    event_free(ev);
    link_unref(l);
}

/* ---- plugin operations ---- */

static void on_close(uv_handle_t *h)
{
    struct zk_disc *zd = h->data;
    zd->open_handles--;
    maybe_free(zd);
}

static void close_handles(struct zk_disc *zd)
{
    uv_handle_t *hs[] = {(uv_handle_t *)&zd->connect_timer, (uv_handle_t *)&zd->retry_timer,
                         (uv_handle_t *)&zd->round_timer, (uv_handle_t *)&zd->watchdog};
    for (size_t i = 0; i < sizeof(hs) / sizeof(hs[0]); i++)
        if (hs[i]->loop && !uv_is_closing(hs[i]))
            uv_close(hs[i], on_close);
}

static void disc_free(struct zk_disc *zd)
{
    warned_clear(&zd->warned);
    warned_clear(&zd->warned_next);
    emx_instset_free(&zd->good);
    free(zd->last_failure);
    free(zd->conn);
    free(zd->path);
    free_secret(zd->digest);
    free(zd);
}

/* Memory goes once destroy was called and libuv let go of our handles; the
 * pool jobs and events in flight hold only links, never zd. */
static void maybe_free(struct zk_disc *zd)
{
    if (zd->destroyed && zd->open_handles == 0)
        disc_free(zd);
}

static bool printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

static int parse_tls(const char *text, const char *service, bool *tls)
{
    if (!text || strcmp(text, "auto") == 0) {
        /* ThingWorx registers as thingworx-https or thingworx-http. */
        *tls = strcmp(service, "thingworx-http") != 0;
        return 0;
    }
    if (strcmp(text, "true") == 0) {
        *tls = true;
        return 0;
    }
    if (strcmp(text, "false") == 0) {
        *tls = false;
        return 0;
    }
    return -EINVAL;
}

static int zk_create(const struct emx_host *host, const void *config, void **instance)
{
    const struct zk_config *cfg = config;
    struct zk_disc *zd;
    bool tls;

    if (!EMX_HOST_HAS(host, discovery_failed))
        return -ENOTSUP;
    if (!cfg->connection_string || !cfg->connection_string[0] ||
        strlen(cfg->connection_string) > PATH_MAX_LEN || !printable(cfg->connection_string)) {
        host->log(host, EMX_LOG_ERROR,
                  "connection_string: expected host:port[,host:port...], e.g. "
                  "\"10.0.0.5:2181,10.0.0.6:2181\"");
        return -EINVAL;
    }
    const char *base = cfg->base_path ? cfg->base_path : "/services";
    size_t blen = strlen(base);
    while (blen > 1 && base[blen - 1] == '/')
        blen--; /* "/services/" is "/services" */
    if (base[0] != '/' || !printable(base) || blen >= PATH_MAX_LEN / 2) {
        host->log(host, EMX_LOG_ERROR, "base_path: expected an absolute znode path like /services");
        return -EINVAL;
    }
    const char *service = cfg->service ? cfg->service : "thingworx-https";
    if (!service[0] || strchr(service, '/') || !printable(service) ||
        strlen(service) >= PATH_MAX_LEN / 4) {
        host->log(host, EMX_LOG_ERROR,
                  "service: expected a service name like thingworx-https, without '/'");
        return -EINVAL;
    }
    if (parse_tls(cfg->tls, service, &tls) < 0) {
        host->log(host, EMX_LOG_ERROR, "tls: expected auto, true or false");
        return -EINVAL;
    }
    if (cfg->session_timeout_ms < 1000 || cfg->session_timeout_ms > 600000) {
        host->log(host, EMX_LOG_ERROR, "session_timeout: expected 1s..10m, found %llu ms",
                  (unsigned long long)cfg->session_timeout_ms);
        return -EINVAL;
    }
    if (cfg->digest && (!strchr(cfg->digest, ':') || cfg->digest[0] == ':')) {
        host->log(host, EMX_LOG_ERROR, "digest: expected user:password");
        return -EINVAL;
    }

    zd = calloc(1, sizeof(*zd));
    if (!zd)
        return -ENOMEM;
    zd->host = host;
    zd->tls = tls;
    zd->timeout_ms = (int)cfg->session_timeout_ms;
    zd->conn = dup_str(cfg->connection_string);
    size_t plen = blen + 1 + strlen(service) + 1;
    zd->path = malloc(plen);
    if (zd->path)
        snprintf(zd->path, plen, "%.*s/%s", blen == 1 ? 0 : (int)blen, base, service);
    if (cfg->digest && cfg->digest[0])
        zd->digest = dup_str(cfg->digest);
    if (!zd->conn || !zd->path || (cfg->digest && cfg->digest[0] && !zd->digest)) {
        disc_free(zd);
        return -ENOMEM;
    }
    /* Process-wide: libzookeeper's info lines are noise to an operator. */
    zoo_set_debug_level(host->log_enabled(host, EMX_LOG_DEBUG) ? ZOO_LOG_LEVEL_INFO
                                                               : ZOO_LOG_LEVEL_WARN);
    *instance = zd;
    return 0;
}

static int zk_start(void *instance)
{
    struct zk_disc *zd = instance;
    uv_loop_t *loop = zd->host->loop;
    int rc;

    if ((rc = uv_timer_init(loop, &zd->connect_timer)) < 0)
        goto fail;
    zd->open_handles++;
    zd->connect_timer.data = zd;
    if ((rc = uv_timer_init(loop, &zd->retry_timer)) < 0)
        goto fail;
    zd->open_handles++;
    zd->retry_timer.data = zd;
    if ((rc = uv_timer_init(loop, &zd->round_timer)) < 0)
        goto fail;
    zd->open_handles++;
    zd->round_timer.data = zd;
    if ((rc = uv_timer_init(loop, &zd->watchdog)) < 0)
        goto fail;
    zd->open_handles++;
    zd->watchdog.data = zd;
    if ((rc = new_link(zd)) < 0)
        return rc;
    zd->host->log(zd->host, EMX_LOG_INFO, "watching %s on ZooKeeper '%s' (%s)", zd->path, zd->conn,
                  zd->tls ? "wss, sslPort" : "ws, port");
    return 0;
fail:
    zd->host->log(zd->host, EMX_LOG_ERROR, "cannot start: %s", uv_strerror(rc));
    return rc;
}

static void zk_stop(void *instance)
{
    struct zk_disc *zd = instance;
    zd->stopped = true;
    abort_round(zd);
    drop_link(zd);
    close_handles(zd);
}

static void zk_destroy(void *instance)
{
    struct zk_disc *zd = instance;
    if (!zd)
        return;
    zd->stopped = true;
    zd->destroyed = true;
    abort_round(zd);
    drop_link(zd);
    close_handles(zd);
    maybe_free(zd);
}

/* A new connection string or path means a new session and a new baseline:
 * recreating the instance is as cheap and simpler. */
static int zk_reconfigure(void *instance, const void *config)
{
    (void)instance;
    (void)config;
    return -ENOTSUP;
}

#define OPT(name_, alias_, type_, def_, required_, field_, help_)                                  \
    {                                                                                              \
        (name_), (alias_), (type_), (def_), (required_), offsetof(struct zk_config, field_),       \
            (help_)                                                                                \
    }

static const struct emx_option zk_options[] = {
    OPT("connection_string", "cx-server.discovery.connectionString", EMX_OPT_STRING, NULL, true,
        connection_string, "ZooKeeper servers, host:port[,host:port...][/chroot]"),
    OPT("base_path", "cx-server.discovery.basePath", EMX_OPT_STRING, "/services", false, base_path,
        "znode under which services register (Curator's basePath)"),
    OPT("service", NULL, EMX_OPT_STRING, "thingworx-https", false, service,
        "service name: thingworx-https (wss, sslPort) or thingworx-http (ws, port)"),
    OPT("tls", NULL, EMX_OPT_STRING, "auto", false, tls,
        "auto (wss unless service is thingworx-http), true or false"),
    OPT("session_timeout", NULL, EMX_OPT_DURATION, "10s", false, session_timeout_ms,
        "ZooKeeper session timeout (the server clamps it to its own limits)"),
    OPT("digest", NULL, EMX_OPT_SECRET, NULL, false, digest,
        "user:password for ZooKeeper digest authentication; never logged"),
    EMX_OPTION_END,
};

EMX_PLUGIN_EXPORT const struct emx_discovery_plugin emx_discovery_plugin = {
    .hdr =
        EMX_PLUGIN_HEADER(EMX_PLUGIN_DISCOVERY, struct emx_discovery_plugin, "zookeeper", "0.1.0"),
    .options = zk_options,
    .config_size = sizeof(struct zk_config),
    .create = zk_create,
    .start = zk_start,
    .stop = zk_stop,
    .destroy = zk_destroy,
    .reconfigure = zk_reconfigure,
};
