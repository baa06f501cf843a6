/* The running server (DESIGN §2): server.workers worker loops, each owning
 * its transport instance, edge listener, router, pipes and timers; worker 0
 * (the main thread) also owns the admin and agent listeners, the signals,
 * the discovery plugin and reloads. See "workers" below for what crosses
 * threads and how. */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "admin.h"
#include "alloc.h"
#include "config.h"
#include "log.h"
#include "netaddr.h"
#include "notify.h"
#include "ops.h"
#include "privdrop.h"
#include "router.h"
#include "setup.h"
#include "status.h"
#include "tunnel_relay.h"

#define TICK_MS           50  /* router timers: request timeouts are seconds */
#define QUEUED_REFRESH_MS 100 /* the kernel drains SIOCOUTQ without telling us */
#define SHUTDOWN_GRACE_MS 5000
#define DRAIN_STEP_MS     50
#define DRAIN_SLACK_MS    3000 /* past drain_spread + request_timeout: stop anyway */
#define EDGES_LIST_LIMIT  1000

/* Edges per real device address (edge.max_connections_per_source). */
struct source_count {
    UT_hash_handle hh;
    uint32_t n;       /* edges (edge.max_connections_per_source) */
    uint32_t tunnels; /* tunnel sockets relayed (edge.max_tunnels_per_source) */
    char addr[EMX_ADDR_MAX];
};

/* A configuration accepted by SIGHUP. Plugin instances borrow strings from
 * the tree they were created with, so it is freed (with its plugin
 * references) once it is neither the running configuration nor the one a
 * discovery instance was created from. */
struct setup_gen {
    struct setup_gen *next;
    struct emx_setup setup;
    unsigned users;
};

/* One discovery plugin instance and its host table. One replaced by a
 * reload is stopped at once, then destroyed and its plugin reference
 * dropped only when the loop holds nothing of it (see retire_step). */
enum disc_state { DISC_RUNNING, DISC_STOPPED, DISC_DESTROYED };

struct disc_gen {
    struct disc_gen *next;
    struct emx_host host;
    char tag[96];
    const struct emx_discovery_plugin *dp;
    void *dinst;
    struct setup_gen *gen; /* the config it borrows; NULL: the start-up one */
    enum disc_state state;
};

#define RETIRE_EVERY_TICKS 4 /* look for a quiet loop every 200 ms */

struct post_item {
    struct post_item *next;
    void (*fn)(void *);
    void *arg;
};

struct pipe_ctx {
    struct emx_server *s;
    struct emx_pipe *p; /* NULL once its instance was removed */
    struct emx_conn *conn;
    uv_timer_t retry;
    unsigned attempts;
    bool dirty;
    bool timer_closed;
    bool connecting; /* counted in s->connecting until on_open or on_close */
    bool queued;     /* waiting in s->connect_wait for a connect slot */
    struct emx_list dirty_link;
    struct emx_list wait_link;
    uint64_t up_since;     /* when its AUTH succeeded; 0: not up */
    uint64_t last_fail_ms; /* when it last failed or closed (the status page) */
    /* The last failure logged at warn, and how often it came again since. */
    char last_reason[128];
    uint64_t last_log_ms;
    unsigned repeats;
};

/* Backoff restarts only for a pipe that stayed up this long: one the
 * platform closes right after its AUTH keeps backing off. */
#define PIPE_STABLE_MS 10000
/* The same failure of a pipe is logged at warn once per this; the repeats
 * go to debug and are counted in the next warn line. */
#define PIPE_LOG_REPEAT_MS 60000
/* Open files kept out of the pipes' budget: listeners, admin, plugins,
 * logs, discovery (the ws transport's fd_reserve default is the same). */
#define FD_CORE_RESERVE 256

struct emx_proc;

struct emx_server {
    uv_loop_t loop;
    struct emx_proc *proc;
    unsigned worker; /* index; 0 runs on the main thread and owns the process-wide parts */
    struct emx_setup *setup;
    struct emx_config *cfg;
    struct emx_log log;
    struct emx_router *router;
    uint64_t rng;
    char boot_hex[17];

    const struct emx_transport_plugin *tp;
    void *tinst;
    struct emx_host thost;
    struct emx_listener *listener;

    const struct emx_discovery_plugin *dp;
    void *dinst;
    struct disc_gen *disc; /* the running discovery instance (dp, dinst) */
    bool discovery_started;

    uv_async_t async;
    pthread_mutex_t post_mu;
    struct post_item *post_head, **post_tail;
    bool post_closed;

    uv_timer_t tick;
    uv_timer_t queued_timer;
    uv_timer_t shutdown_timer;
    uv_check_t check;
    uv_signal_t sigterm, sigint, sighup;
    struct emx_admin *admin;
    struct emx_list dirty;
    struct emx_list connect_wait; /* pipes waiting for a connect slot, FIFO */
    unsigned connecting;          /* pipes between connect and open or close */

    char *hdr_appkey, *hdr_server, *hdr_boot;
    const char *pipe_headers[3];
    bool stopping;
    int exit_code;

    /* operations: admin API, agent, drain, reload, device addresses */
    struct emx_agent *agent;
    struct emx_server_counters counters;
    struct emx_status status; /* the status page's events and rates */
    bool actions_on;          /* admin.token_file set: POST actions allowed */
    uint64_t start_ms;
    const struct emx_host *dhost_active; /* discovery updates from others are ignored */
    struct disc_gen *disc_retired;       /* replaced instances not unloaded yet */
    unsigned retire_ticks;
    bool discovery_stale; /* a reload's discovery failed to start: the next reload retries */
    struct setup_gen *setups;
    uint32_t *drain_ids;
    size_t drain_n, drain_idx, drain_waiting;
    uint64_t drain_start;
    bool finished;
    struct emx_relays relays; /* tunnel sockets the transport relays */
    bool transport_running; /* started and not yet stopped */
    bool drain_done;        /* worker 0: its own drain ended; waiting for the others */
    bool force_stop;        /* a second signal: stop without waiting for answers */
    unsigned iso_depth;     /* worker 0: nested workers_isolate() calls */
    bool loop_ok, status_ok, relays_ok; /* made, so worker_free undoes them */
    char ttag[96];
    char listen_addr[300];
};

/* ------------------------------------------------------------------ */
/* workers
 *
 * Ownership. Each worker's struct emx_server, its loop and everything on
 * that loop (transport instance, listener, router, edges, pipes, timers,
 * status) belong to the thread that runs the loop: worker 0 on the main
 * thread, worker k on thread k. Before the threads start and after they
 * are joined they belong to the main thread, which creates and destroys
 * them all. Nothing of one worker is used by another's thread except:
 *
 *  - its post queue (post_mu): any thread appends a job; the owner's
 *    uv_async callback takes the list under the lock and runs the jobs on
 *    its own thread. A job and its argument belong to the queue from a
 *    successful post until the owner unlinks it, then to the owner. This
 *    carries discovery sets (copied), reload settings, admin actions and
 *    the drain from worker 0 to the others.
 *  - isolation (struct emx_proc mu/cond): worker 0 posts a park job to
 *    every other worker and waits until each is parked inside it (or its
 *    loop has ended); until worker 0 releases them it may read every
 *    worker's state (admin views, readiness, the agent) and write the
 *    process-wide settings every worker reads (configuration pointer,
 *    log settings, trusted proxies, pipe headers). Actions that change a
 *    worker's router or transport are posted to it instead.
 *  - proc->sources (src_mu) and proc->edges (atomic): the per-source and
 *    process-wide connection limits (edges, and tunnel sockets per source).
 *  - proc->devices (its own mutex): the device tunnel sockets relayed, so
 *    a second one for a tunnel is refused on any worker.
 *  - proc->socks (atomic) and edge hand-off: each worker's transport
 *    counts its edge sockets; one that holds clearly more than the least
 *    loaded worker hands a just-accepted socket (a bare fd, nothing read
 *    from it yet) to that worker through its post queue. The socket
 *    becomes an edge only there: no edge ever moves between workers.
 *
 * With server.workers 1 there is no other thread: isolation, the
 * fan-out of discovery and the posted jobs are skipped, and the loop runs
 * exactly as a single-loop server. */

#define EMX_WORKERS_MAX 16

struct emx_proc {
    unsigned n; /* server.workers */
    struct emx_server *w[EMX_WORKERS_MAX];
    pthread_t thread[EMX_WORKERS_MAX];
    bool thread_started[EMX_WORKERS_MAX];
    pthread_mutex_t mu; /* guards parked, iso_gen, done */
    pthread_cond_t cond;
    unsigned parked;            /* workers parked for the isolation under way */
    uint64_t iso_gen;           /* bumped by each release: parked workers return */
    bool done[EMX_WORKERS_MAX]; /* worker k's loop has ended */
    atomic_size_t edges;        /* edges of every worker (edge.max_connections) */
    atomic_size_t tunnels;      /* tunnel records of every worker (edge.max_tunnels) */
    atomic_size_t relays;       /* tunnel sockets relayed by every worker (edge.max_tunnels) */
    struct emx_relay_device_set devices; /* device tunnel sockets relayed by every worker */
    /* Edge sockets each worker's transport holds (edge_count), read by
     * every worker to balance (edge_balance): relaxed, a hint only. */
    atomic_uint socks[EMX_WORKERS_MAX];
    pthread_mutex_t src_mu;     /* guards sources */
    struct source_count *sources; /* edges per device address, all workers */
    /* Edges' trusted proxies: owned by worker 0, replaced only while the
     * others are parked, read by every worker at accept. */
    struct emx_cidr_list trusted;
};

static uint64_t now_ms(struct emx_server *s)
{
    return uv_now(&s->loop);
}

/* The wall clock, for the times the status page shows (Unix ms). */
static int64_t wall_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void status_event(struct emx_server *s, enum emx_event_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void status_event(struct emx_server *s, enum emx_event_kind kind, const char *fmt, ...)
{
    char text[EMX_EVENT_TEXT_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    emx_status_event(&s->status, kind, 1, now_ms(s), wall_ms(), "%s", text);
}

static uint64_t rng_next(struct emx_server *s)
{
    /* xorshift64*: jitter only, not security */
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return x * 2685821657736338717ull;
}

/* ------------------------------------------------------------------ */
/* the host tables */

static struct emx_server *host_server(const struct emx_host *h)
{
    return h->core;
}

static void host_log(const struct emx_host *h, enum emx_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emx_vlogf(&host_server(h)->log, level, h->tag, fmt, ap);
    va_end(ap);
}

static bool host_log_enabled(const struct emx_host *h, enum emx_log_level level)
{
    return emx_log_enabled(&host_server(h)->log, level);
}

static int host_post(const struct emx_host *h, void (*fn)(void *), void *arg)
{
    struct emx_server *s = host_server(h);
    struct post_item *it = malloc(sizeof(*it)); /* any thread: plain malloc */
    if (!it)
        return -ENOMEM;
    it->next = NULL;
    it->fn = fn;
    it->arg = arg;
    pthread_mutex_lock(&s->post_mu);
    if (s->post_closed) {
        pthread_mutex_unlock(&s->post_mu);
        free(it);
        return -ESHUTDOWN;
    }
    *s->post_tail = it;
    s->post_tail = &it->next;
    /* Under the lock: the loop cannot close the handle in between. */
    uv_async_send(&s->async);
    pthread_mutex_unlock(&s->post_mu);
    return 0;
}

/* Run fn(arg) on worker s's loop (any thread). 0, -ENOMEM, or
 * -ESHUTDOWN once that worker has stopped (fn will not run). */
static int worker_post(struct emx_server *s, void (*fn)(void *), void *arg)
{
    return host_post(&s->thost, fn, arg);
}

/* A park job: worker k waits here until worker 0 releases the isolation. */
static void worker_park(void *arg)
{
    struct emx_proc *P = arg;
    pthread_mutex_lock(&P->mu);
    uint64_t gen = P->iso_gen;
    P->parked++;
    pthread_cond_broadcast(&P->cond);
    while (P->iso_gen == gen)
        pthread_cond_wait(&P->cond, &P->mu);
    pthread_mutex_unlock(&P->mu);
}

/* Worker 0: stop every other worker in a known place (parked in a posted
 * job, or its loop ended) so their state may be read and the shared
 * settings written. Nests; each call is matched by workers_release(). A
 * no-op with one worker. */
static void workers_isolate(struct emx_server *s0)
{
    struct emx_proc *P = s0->proc;
    if (P->n == 1 || s0->iso_depth++ > 0)
        return;
    bool posted[EMX_WORKERS_MAX] = {false};
    unsigned want = 0;
    for (unsigned k = 1; k < P->n; k++)
        if (P->thread_started[k] && worker_post(P->w[k], worker_park, P) == 0) {
            posted[k] = true;
            want++;
        }
    pthread_mutex_lock(&P->mu);
    for (;;) {
        /* a worker that refused the job is stopping: wait for its loop
         * to end, as its close callbacks still change its router */
        bool all = P->parked >= want;
        for (unsigned k = 1; k < P->n && all; k++)
            if (!posted[k] && P->thread_started[k] && !P->done[k])
                all = false;
        if (all)
            break;
        pthread_cond_wait(&P->cond, &P->mu);
    }
    pthread_mutex_unlock(&P->mu);
}

static void workers_release(struct emx_server *s0)
{
    struct emx_proc *P = s0->proc;
    if (P->n == 1 || --s0->iso_depth > 0)
        return;
    pthread_mutex_lock(&P->mu);
    P->parked = 0;
    P->iso_gen++;
    pthread_cond_broadcast(&P->cond);
    pthread_mutex_unlock(&P->mu);
}

/* Worker 0: have the other workers all ended their loops? */
static bool workers_others_done(struct emx_server *s0)
{
    struct emx_proc *P = s0->proc;
    bool all = true;
    if (P->n == 1)
        return true;
    pthread_mutex_lock(&P->mu);
    for (unsigned k = 1; k < P->n; k++)
        if (P->thread_started[k] && !P->done[k])
            all = false;
    pthread_mutex_unlock(&P->mu);
    return all;
}

static void on_async(uv_async_t *a)
{
    struct emx_server *s = a->data;
    pthread_mutex_lock(&s->post_mu);
    struct post_item *list = s->post_head;
    s->post_head = NULL;
    s->post_tail = &s->post_head;
    pthread_mutex_unlock(&s->post_mu);
    while (list) {
        struct post_item *it = list;
        list = it->next;
        it->fn(it->arg);
        free(it);
    }
}

static uint64_t host_now(const struct emx_host *h)
{
    return now_ms(host_server(h));
}

/* Pipes a set may take: half of the open-file limit left after the core's
 * own reserve, so the devices always keep the other half. 0: no limit. */
static uint64_t pipe_fd_budget(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return 0;
    return rl.rlim_cur > FD_CORE_RESERVE ? (rl.rlim_cur - FD_CORE_RESERVE) / 2 : 1;
}

/* ---- discovery reaches every worker ---- */

/* A discovery set (or failure) copied for another worker: one block, the
 * array followed by its strings. Owned by the post queue, then by the job. */
struct disc_msg {
    struct emx_server *s; /* the worker it is for */
    size_t count;
    const char *reason; /* a failure: the reason; else NULL */
    struct emx_instance_info set[];
};

static size_t str_room(const char *str)
{
    return str ? strlen(str) + 1 : 0;
}

static const char *str_put(char **at, const char *str)
{
    if (!str)
        return NULL;
    size_t n = strlen(str) + 1;
    memcpy(*at, str, n);
    const char *out = *at;
    *at += n;
    return out;
}

/* malloc, not emx_malloc: it may be freed by another thread's job. */
static struct disc_msg *disc_msg_new(struct emx_server *to, const struct emx_instance_info *set,
                                     size_t count, const char *reason)
{
    size_t room = sizeof(struct disc_msg) + count * sizeof(set[0]) + str_room(reason);
    for (size_t i = 0; i < count; i++)
        room += str_room(set[i].id) + str_room(set[i].host) + str_room(set[i].metadata);
    struct disc_msg *m = malloc(room);
    if (!m)
        return NULL;
    char *at = (char *)&m->set[count];
    m->s = to;
    m->count = count;
    m->reason = str_put(&at, reason);
    for (size_t i = 0; i < count; i++) {
        m->set[i] = set[i];
        m->set[i].id = str_put(&at, set[i].id);
        m->set[i].host = str_put(&at, set[i].host);
        m->set[i].metadata = str_put(&at, set[i].metadata);
    }
    return m;
}

/* Runs on the worker the message is for. */
static void disc_msg_apply(void *arg)
{
    struct disc_msg *m = arg;
    struct emx_server *s = m->s;
    if (!s->stopping) {
        if (m->reason)
            emx_router_discovery_failed(s->router, m->reason, now_ms(s));
        else
            emx_router_discovery_update(s->router, m->set, m->count, now_ms(s));
        emx_status_track(&s->status, s->router, now_ms(s), wall_ms());
    }
    free(m);
}

static int worker_post(struct emx_server *s, void (*fn)(void *), void *arg);

/* Worker 0: hand a set or a failure to every other worker. */
static void disc_fan_out(struct emx_server *s, const struct emx_instance_info *set, size_t count,
                         const char *reason)
{
    struct emx_proc *P = s->proc;
    for (unsigned k = 1; k < P->n; k++) {
        struct disc_msg *m = disc_msg_new(P->w[k], set, count, reason);
        if (!m) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server",
                     "out of memory handing a discovery set to worker %u", k);
            continue;
        }
        if (worker_post(P->w[k], disc_msg_apply, m) != 0)
            free(m); /* that worker has stopped */
    }
}

static void host_discovery_update(const struct emx_host *h, const struct emx_instance_info *set,
                                  size_t count)
{
    struct emx_server *s = host_server(h);
    if (s->stopping || h != s->dhost_active)
        return;
    /* A set too large to serve is a failure of the source: the router keeps
     * its last good set, logs the reason and counts it. */
    char why[300];
    /* every worker has pipes_per_instance pipes to each instance */
    uint64_t per = emx_router_config(s->router)->pipes_per_instance * s->proc->n;
    uint64_t budget = pipe_fd_budget();
    if (count > (uint64_t)s->cfg->discovery.max_instances) {
        snprintf(why, sizeof(why),
                 "set of %zu instances refused: more than discovery.max_instances (%" PRId64 ")",
                 count, s->cfg->discovery.max_instances);
    } else if (budget && count * per > budget) {
        snprintf(why, sizeof(why),
                 "set of %zu instances refused: its %" PRIu64 " pipes (%" PRIu64
                 " per instance%s) exceed the open-file budget of %" PRIu64
                 " (half of the file limit after %d reserved): raise the file limit or lower "
                 "platform.pipes_per_instance",
                 count, count * per, per, s->proc->n > 1 ? ", all workers" : "", budget,
                 FD_CORE_RESERVE);
    } else {
        emx_router_discovery_update(s->router, set, count, now_ms(s));
        emx_status_track(&s->status, s->router, now_ms(s), wall_ms());
        disc_fan_out(s, set, count, NULL);
        return;
    }
    emx_router_discovery_failed(s->router, why, now_ms(s));
    status_event(s, EMX_EV_DISCOVERY, "discovery failed: %s", why);
    disc_fan_out(s, NULL, 0, why);
}

static void host_discovery_failed(const struct emx_host *h, const char *reason)
{
    struct emx_server *s = host_server(h);
    if (h == s->dhost_active) {
        emx_router_discovery_failed(s->router, reason, now_ms(s));
        status_event(s, EMX_EV_DISCOVERY, "discovery failed (the last good set stays): %s",
                     reason ? reason : "unknown");
        disc_fan_out(s, NULL, 0, reason ? reason : "unknown");
    }
}

/* ---- edges balanced over the workers ---- */

static void host_edge_count(const struct emx_host *h, int delta)
{
    struct emx_server *s = host_server(h);
    atomic_uint *n = &s->proc->socks[s->worker];

    s->counters.sockets += (uint64_t)(int64_t)delta; /* the gauge, read while parked */
    if (delta >= 0)
        atomic_fetch_add_explicit(n, (unsigned)delta, memory_order_relaxed);
    else
        atomic_fetch_sub_explicit(n, (unsigned)-delta, memory_order_relaxed);
}

/* The worker that should serve a socket this worker just accepted: itself,
 * unless it holds clearly more sockets than the least loaded worker. The
 * kernel's SO_REUSEPORT hash is random (200 sockets over four workers miss
 * a quarter by more than 25 % about one time in twelve) and devices stay
 * connected for days, so a skew made in a reconnect storm would last. The
 * slack, 2 plus an eighth of the mean, makes hand-offs rare once each
 * worker holds many sockets, where the hash is even enough. A worker at
 * its share of the file budget (cap) hands every socket to one with room,
 * so devices the kernel sends to it are not refused while others have
 * room. */
static uint32_t host_edge_balance(const struct emx_host *h, unsigned cap)
{
    struct emx_server *s = host_server(h);
    struct emx_proc *P = s->proc;
    unsigned mine = atomic_load_explicit(&P->socks[s->worker], memory_order_relaxed);
    unsigned least = mine, best = s->worker;
    uint64_t total = 0;

    for (unsigned k = 0; k < P->n; k++) {
        unsigned v = atomic_load_explicit(&P->socks[k], memory_order_relaxed);
        total += v;
        if (v < least) {
            least = v;
            best = k;
        }
    }
    if (cap && mine >= cap)
        return least < cap ? best : s->worker;
    if (mine <= least + 2 + total / (8u * P->n))
        return s->worker;
    return best;
}

struct hand_off {
    struct emx_server *to;
    int fd;
};

static bool transport_adopts(const struct emx_transport_plugin *tp)
{
    return tp->hdr.struct_size >=
               offsetof(struct emx_transport_plugin, adopt) + sizeof(tp->adopt) &&
           tp->adopt;
}

/* Runs on the worker the socket was handed to. Once that worker has closed
 * its listener (stopping), the socket is closed: the device reconnects.
 * The place the hand-off reserved is given back once the transport has
 * counted the socket itself (or not, when it could not take it). */
static void hand_off_run(void *arg)
{
    struct hand_off *ho = arg;
    struct emx_server *s = ho->to;
    int fd = ho->fd;

    free(ho);
    if (!s->listener) {
        close(fd);
    } else {
        s->counters.handed_in++;
        s->tp->adopt(s->listener, fd); /* owns fd, also on failure */
    }
    atomic_fetch_sub_explicit(&s->proc->socks[s->worker], 1, memory_order_relaxed);
}

static int host_edge_hand_off(const struct emx_host *h, uint32_t worker, int fd)
{
    struct emx_server *s = host_server(h);
    struct emx_proc *P = s->proc;

    if (worker >= P->n || worker == s->worker || fd < 0)
        return -EINVAL;
    struct emx_server *to = P->w[worker];
    if (!to || !transport_adopts(to->tp))
        return -ENOTSUP;
    struct hand_off *ho = malloc(sizeof(*ho)); /* freed on the other worker */
    if (!ho)
        return -ENOMEM;
    ho->to = to;
    ho->fd = fd;
    /* counted for its worker at once: sockets on their way count when the
     * next one is placed, or a burst would all go to the same worker */
    atomic_fetch_add_explicit(&P->socks[worker], 1, memory_order_relaxed);
    int rc = worker_post(to, hand_off_run, ho);
    if (rc) {
        atomic_fetch_sub_explicit(&P->socks[worker], 1, memory_order_relaxed);
        free(ho);
        return rc;
    }
    return 0;
}

static void host_init(struct emx_server *s, struct emx_host *h, const char *tag)
{
    memset(h, 0, sizeof(*h));
    h->struct_size = sizeof(*h);
    h->abi_major = EMX_ABI_MAJOR;
    h->abi_minor = EMX_ABI_MINOR;
    h->tag = tag;
    h->loop = &s->loop;
    h->core = s;
    h->log = host_log;
    h->log_enabled = host_log_enabled;
    h->post = host_post;
    h->now_ms = host_now;
    h->parse_size = emx_parse_size;
    h->parse_duration = emx_parse_duration;
    h->discovery_update = host_discovery_update;
    h->discovery_failed = host_discovery_failed;
    h->worker = s->worker;
    h->workers = s->proc->n;
    if (s->proc->n > 1) { /* one worker: nothing to balance, no cost */
        h->edge_count = host_edge_count;
        h->edge_balance = host_edge_balance;
        h->edge_hand_off = host_edge_hand_off;
    }
}

/* ------------------------------------------------------------------ */
/* edges */

/* The caller holds proc->src_mu. */
static struct source_count *source_find(struct emx_proc *P, const char *addr)
{
    struct source_count *sc;
    HASH_FIND_STR(P->sources, addr, sc);
    return sc;
}

/* A new, empty count for addr, or NULL without memory. The caller holds
 * proc->src_mu; the count is freed by whichever worker releases it last. */
static struct source_count *source_new(struct emx_proc *P, const char *addr)
{
    struct source_count *sc = calloc(1, sizeof(*sc));
    if (sc) {
        snprintf(sc->addr, sizeof(sc->addr), "%s", addr);
        HASH_ADD_STR(P->sources, addr, sc);
    }
    return sc;
}

/* The caller holds proc->src_mu. */
static void source_forget_unused(struct emx_proc *P, struct source_count *sc)
{
    if (sc->n == 0 && sc->tunnels == 0) {
        HASH_DEL(P->sources, sc);
        free(sc);
    }
}

static void source_release(struct emx_server *s, const char *addr)
{
    struct emx_proc *P = s->proc;
    pthread_mutex_lock(&P->src_mu);
    struct source_count *sc = source_find(P, addr);
    if (sc && sc->n > 0) {
        sc->n--;
        source_forget_unused(P, sc);
    }
    pthread_mutex_unlock(&P->src_mu);
    atomic_fetch_sub_explicit(&P->edges, 1, memory_order_relaxed);
}

/* A tunnel socket's place under edge.max_tunnels_per_source (tunnel_relay.h):
 * the same table as the edges', so every worker counts the address. */
static int source_take_tunnel(void *ctx, const char *addr, uint64_t limit)
{
    struct emx_server *s = ctx;
    struct emx_proc *P = s->proc;
    int rc = 0;
    pthread_mutex_lock(&P->src_mu);
    struct source_count *sc = source_find(P, addr);
    if (sc && limit && sc->tunnels >= limit)
        rc = -EBUSY;
    else if (!sc && !(sc = source_new(P, addr)))
        rc = -ENOMEM;
    else
        sc->tunnels++;
    pthread_mutex_unlock(&P->src_mu);
    return rc;
}

static void source_give_tunnel(void *ctx, const char *addr)
{
    struct emx_server *s = ctx;
    struct emx_proc *P = s->proc;
    pthread_mutex_lock(&P->src_mu);
    struct source_count *sc = source_find(P, addr);
    if (sc && sc->tunnels > 0) {
        sc->tunnels--;
        source_forget_unused(P, sc);
    }
    pthread_mutex_unlock(&P->src_mu);
}

static void *edge_on_accept(void *listener_user, struct emx_conn *conn,
                            const struct emx_conn_info *info)
{
    struct emx_server *s = listener_user;
    struct emx_proc *P = s->proc;
    /* The device's address: X-Forwarded-For only from a trusted proxy. */
    char addr[EMX_ADDR_MAX];
    bool fwd = emx_real_address(&P->trusted, info->peer, info->forwarded_for, addr, sizeof(addr));
    enum emx_refuse_reason why = EMX_REFUSE__COUNT;
    int64_t max = s->cfg->edge.max_connections;
    /* edge.max_connections counts the edges of every worker: take a place
     * first, give it back on refusal */
    size_t placed = atomic_fetch_add_explicit(&P->edges, 1, memory_order_relaxed) + 1;
    pthread_mutex_lock(&P->src_mu);
    struct source_count *sc = source_find(P, addr);
    if (s->stopping)
        why = EMX_REFUSE_DRAINING;
    else if (max > 0 && placed > (size_t)max)
        why = EMX_REFUSE_MAX_CONNECTIONS;
    else if (s->cfg->edge.max_connections_per_source > 0 && sc &&
             sc->n >= (uint64_t)s->cfg->edge.max_connections_per_source)
        why = EMX_REFUSE_PER_SOURCE;
    if (why == EMX_REFUSE__COUNT && !sc && !(sc = source_new(P, addr)))
        why = EMX_REFUSE_NO_MEMORY;
    if (why == EMX_REFUSE__COUNT)
        sc->n++; /* taken now, so a sibling worker counts it at once */
    pthread_mutex_unlock(&P->src_mu);
    if (why != EMX_REFUSE__COUNT) {
        atomic_fetch_sub_explicit(&P->edges, 1, memory_order_relaxed);
        s->counters.refused[why]++;
        emx_logf(&s->log, why == EMX_REFUSE_DRAINING ? EMX_LOG_DEBUG : EMX_LOG_WARN, "edge",
                 "refusing %s (peer %s): %s", addr, info->peer ? info->peer : "?",
                 emx_refuse_reason_name(why));
        return NULL;
    }
    struct emx_edge *e = emx_router_edge_open(s->router, conn, now_ms(s));
    if (!e) {
        s->counters.refused[EMX_REFUSE_NO_MEMORY]++;
        source_release(s, addr);
        return NULL;
    }
    s->counters.forwarded_for += fwd;
    snprintf(e->addr, sizeof(e->addr), "%s", addr);
    snprintf(e->peer, sizeof(e->peer), "%s", info->peer ? info->peer : "?");
    emx_logf(&s->log, EMX_LOG_DEBUG, "edge", "edge %08" PRIx32 " connected from %s%s%s%s%s", e->id,
             addr, fwd ? " via " : "", fwd ? e->peer : "", info->deflate ? " (deflate)" : "",
             info->tls ? " (tls)" : "");
    return e;
}

static struct emx_server *edge_server(struct emx_edge *e)
{
    return emx_router_io_ctx(e->router);
}

static void edge_on_message(void *user, uint8_t *data, size_t len)
{
    struct emx_edge *e = user;
    struct emx_server *s = edge_server(e);
    emx_router_edge_message(s->router, e, data, len, now_ms(s));
}

static void edge_on_writable(void *user)
{
    (void)user; /* edges: the transport drains its own queue */
}

static void edge_on_close(void *user, uint16_t code, const char *reason)
{
    struct emx_edge *e = user;
    struct emx_server *s = edge_server(e);
    emx_logf(&s->log, EMX_LOG_DEBUG, "edge", "edge %08" PRIx32 " (%s) closed (%u %s)", e->id,
             e->addr, code, reason ? reason : "");
    source_release(s, e->addr);
    emx_router_edge_closed(s->router, e, now_ms(s));
}

static void *edge_on_tunnel(void *listener_user, struct emx_conn *conn,
                            const struct emx_tunnel_request *req, struct emx_tunnel_route *route,
                            int *status)
{
    struct emx_server *s = listener_user;
    return emx_relays_on_tunnel(&s->relays, conn, req, route, status);
}

static const struct emx_conn_callbacks edge_callbacks = {
    .on_accept = edge_on_accept,
    .on_message = edge_on_message,
    .on_writable = edge_on_writable,
    .on_close = edge_on_close,
    .on_tunnel = edge_on_tunnel,
    .on_tunnel_open = emx_relays_on_open,
    .on_tunnel_end = emx_relays_on_end,
};

static uint64_t relay_now(void *ctx)
{
    return now_ms(ctx);
}

/* ------------------------------------------------------------------ */
/* pipes */

static void pipe_connect(struct pipe_ctx *pc);

static void on_retry(uv_timer_t *t)
{
    pipe_connect(t->data);
}

static void pipe_schedule_retry(struct pipe_ctx *pc)
{
    struct emx_server *s = pc->s;
    if (s->stopping || !pc->p)
        return;
    /* Exponential backoff with jitter: [d/2, d], d doubling to reconnect_max. */
    uint64_t d = s->cfg->platform.reconnect_min ? s->cfg->platform.reconnect_min : 100;
    for (unsigned i = 0; i < pc->attempts && d < s->cfg->platform.reconnect_max; i++)
        d *= 2;
    if (d > s->cfg->platform.reconnect_max)
        d = s->cfg->platform.reconnect_max;
    uint64_t delay = d / 2 + (d > 1 ? rng_next(s) % (d / 2 + 1) : 0);
    pc->attempts++;
    uv_timer_start(&pc->retry, on_retry, delay, 0);
}

/* A connect slot is free again: the next waiting pipe takes it. */
static void pipe_connect_done(struct pipe_ctx *pc)
{
    struct emx_server *s = pc->s;
    if (!pc->connecting)
        return;
    pc->connecting = false;
    s->connecting--;
    while (!emx_list_empty(&s->connect_wait) &&
           s->connecting < (uint64_t)s->cfg->platform.max_connecting) {
        struct pipe_ctx *next = emx_container_of(s->connect_wait.next, struct pipe_ctx, wait_link);
        emx_list_unlink(&next->wait_link);
        next->queued = false;
        pipe_connect(next);
    }
}

static void pipe_unqueue(struct pipe_ctx *pc)
{
    if (pc->queued) {
        pc->queued = false;
        emx_list_unlink(&pc->wait_link);
    }
}

/* One warn line per distinct failure of a pipe and PIPE_LOG_REPEAT_MS; the
 * same failure again in between goes to debug and is counted. */
static void pipe_log_close(struct pipe_ctx *pc, bool was_up, uint16_t code, const char *reason)
{
    struct emx_server *s = pc->s;
    const struct emx_pipe *p = pc->p;
    uint64_t now = now_ms(s);
    char text[sizeof(pc->last_reason)];
    snprintf(text, sizeof(text), "%u %s", code, reason && reason[0] ? reason : "no reason given");
    pc->last_fail_ms = now;
    char up[64] = "";
    if (was_up)
        snprintf(up, sizeof(up), " after %" PRIu64 " ms up", now - pc->up_since);
    if (strcmp(text, pc->last_reason) == 0 && now - pc->last_log_ms < PIPE_LOG_REPEAT_MS) {
        pc->repeats++;
        emx_logf(&s->log, EMX_LOG_DEBUG, "pipe", "instance %s pipe %u %s (%s)%s", p->inst->id,
                 p->index, was_up ? "closed" : "failed", text, up);
        return;
    }
    char again[64] = "";
    if (pc->repeats)
        snprintf(again, sizeof(again), "; %u more time(s) since the last such line", pc->repeats);
    emx_logf(&s->log, EMX_LOG_WARN, "pipe", "instance %s pipe %u %s (%s)%s%s", p->inst->id,
             p->index, was_up ? "closed" : "failed", text, up, again);
    snprintf(pc->last_reason, sizeof(pc->last_reason), "%s", text);
    pc->last_log_ms = now;
    pc->repeats = 0;
}

static void pipe_free_if_done(struct pipe_ctx *pc)
{
    if (!pc->p && !pc->conn && pc->timer_closed) {
        emx_list_unlink(&pc->dirty_link);
        emx_free(pc);
    }
}

static void pipe_on_open(void *user, struct emx_conn *conn, const struct emx_conn_info *info)
{
    (void)info;
    struct pipe_ctx *pc = user;
    pc->conn = conn;
    pipe_connect_done(pc);
    if (!pc->p) {
        pc->s->tp->close(conn, 1001, "instance removed");
        return;
    }
    emx_router_pipe_opened(pc->s->router, pc->p, now_ms(pc->s));
}

static void pipe_on_message(void *user, uint8_t *data, size_t len)
{
    struct pipe_ctx *pc = user;
    if (!pc->p)
        return;
    emx_router_pipe_message(pc->s->router, pc->p, data, len, now_ms(pc->s));
    /* Its AUTH succeeded: whether the backoff starts over depends on how
     * long it stays up (pipe_on_close). */
    if (pc->p && pc->p->state == EMX_PIPE_UP && !pc->up_since)
        pc->up_since = now_ms(pc->s);
}

static void pipe_mark_dirty(struct pipe_ctx *pc)
{
    if (!pc->dirty) {
        pc->dirty = true;
        emx_list_push_back(&pc->s->dirty, &pc->dirty_link);
    }
}

static void pipe_on_writable(void *user)
{
    struct pipe_ctx *pc = user;
    if (pc->p && pc->conn)
        pipe_mark_dirty(pc);
}

static void pipe_on_close(void *user, uint16_t code, const char *reason)
{
    struct pipe_ctx *pc = user;
    struct emx_server *s = pc->s;
    pc->conn = NULL;
    pipe_connect_done(pc);
    if (pc->dirty) {
        pc->dirty = false;
        emx_list_unlink(&pc->dirty_link);
    }
    if (!pc->p) {
        pipe_free_if_done(pc);
        return;
    }
    struct emx_pipe *p = pc->p;
    bool was_up = pc->up_since != 0;
    /* The transport's reason says what failed (resolution, connect, TLS,
     * upgrade, a close by the platform): it is logged as given. */
    pipe_log_close(pc, was_up, code, reason);
    if (was_up && now_ms(s) - pc->up_since >= PIPE_STABLE_MS)
        pc->attempts = 0;
    pc->up_since = 0;
    emx_router_pipe_closed(s->router, p, now_ms(s));
    /* The router may have removed the instance meanwhile (drained). */
    if (pc->p)
        pipe_schedule_retry(pc);
}

static const struct emx_conn_callbacks pipe_callbacks = {
    .on_open = pipe_on_open,
    .on_message = pipe_on_message,
    .on_writable = pipe_on_writable,
    .on_close = pipe_on_close,
};

static void pipe_connect(struct pipe_ctx *pc)
{
    struct emx_server *s = pc->s;
    if (s->stopping || !pc->p || pc->conn || pc->queued)
        return;
    /* Bounded connects in flight: a large set opens its pipes a slot at a
     * time instead of all in one loop iteration. */
    if (s->connecting >= (uint64_t)s->cfg->platform.max_connecting) {
        pc->queued = true;
        emx_list_push_back(&s->connect_wait, &pc->wait_link);
        return;
    }
    const struct emx_instance *inst = pc->p->inst;
    const struct emx_config *cfg = s->cfg;
    struct emx_connect_spec spec = {
        .host = inst->host,
        .port = inst->port,
        .path = cfg->platform.path,
        .tls = inst->tls,
        .tls_ca = cfg->platform.tls_ca,
        .tls_cert = cfg->platform.tls_cert,
        .tls_key = cfg->platform.tls_key,
        .tls_verify = cfg->platform.tls_verify,
        .headers = s->pipe_headers,
        .header_count = 3,
        .max_message_size = cfg->edge.max_message_size,
        .sndbuf = (uint32_t)cfg->platform.sndbuf,
        .ping_interval_ms = cfg->platform.ping_interval,
        .idle_read_timeout_ms = cfg->platform.idle_read_timeout,
        .connect_timeout_ms = cfg->platform.connect_timeout,
    };
    struct emx_conn *conn = NULL;
    int rc = s->tp->connect(s->tinst, &spec, &pipe_callbacks, pc, &conn);
    if (rc != 0) {
        pipe_log_close(pc, false, 0, strerror(-rc));
        pipe_schedule_retry(pc);
        return;
    }
    /* Known from now on, so removing the instance while this connect is
     * still under way can close it; on_open or on_close follows (never from
     * inside connect), and pc lives until on_close has run. */
    pc->conn = conn;
    pc->connecting = true;
    s->connecting++;
}

static void retry_closed(uv_handle_t *h)
{
    struct pipe_ctx *pc = h->data;
    pc->timer_closed = true;
    pipe_free_if_done(pc);
}

/* ------------------------------------------------------------------ */
/* router io */

static int io_edge_send(void *ctx, struct emx_edge *e, const uint8_t *buf, size_t len)
{
    struct emx_server *s = ctx;
    uint64_t limit = s->cfg->edge.max_queued;
    int rc = s->tp->send(e->conn, buf, len);
    if (rc != 0 || !limit)
        return rc;
    /* buffered() costs an ioctl. What the edge still holds can only have
     * grown by what we sent since the last reading, so keep a ceiling and
     * ask only when it passes the limit: the limit is exactly as strict, at
     * one ioctl per ~limit bytes sent to an edge that reads. 2 * len + 64
     * covers the wire's overhead: headers of the smallest frames, a TLS
     * record per frame, deflate's worst-case expansion. */
    e->queued_bound += 2 * (uint64_t)len + 64;
    if (e->queued_bound <= limit)
        return 0;
    e->queued_bound = s->tp->buffered(e->conn);
    return e->queued_bound > limit ? -ENOBUFS : 0;
}

/* What the edge has not read yet; the router asks when a request arrives. */
static size_t io_edge_buffered(void *ctx, struct emx_edge *e)
{
    struct emx_server *s = ctx;
    size_t n = s->tp->buffered(e->conn);
    e->queued_bound = n; /* as good a reading for io_edge_send's ceiling */
    return n;
}

/* A pipe's queue read again when no pipe looks writable to a request. */
static size_t io_pipe_buffered(void *ctx, struct emx_pipe *p)
{
    struct emx_server *s = ctx;
    struct pipe_ctx *pc = p->conn;
    return pc && pc->conn ? s->tp->buffered(pc->conn) : (size_t)p->wm.queued;
}

static void io_edge_close(void *ctx, struct emx_edge *e, uint16_t code, const char *reason)
{
    struct emx_server *s = ctx;
    emx_logf(&s->log, EMX_LOG_INFO, "edge", "closing edge %08" PRIx32 " (%s): %u %s", e->id,
             e->addr, code, reason);
    s->tp->close(e->conn, code, reason);
}

/* ABI 1.2: the edge may now send messages up to edge.max_message_size. */
static void io_edge_authenticated(void *ctx, struct emx_edge *e)
{
    struct emx_server *s = ctx;
    if (s->tp->hdr.struct_size >= offsetof(struct emx_transport_plugin, set_message_limit) +
                                      sizeof(s->tp->set_message_limit) &&
        s->tp->set_message_limit)
        s->tp->set_message_limit(e->conn, 0);
}

static void io_edge_pause(void *ctx, struct emx_edge *e, bool pause)
{
    struct emx_server *s = ctx;
    s->tp->pause_read(e->conn, pause);
}

static int io_pipe_send(void *ctx, struct emx_pipe *p, const uint8_t *buf, size_t len)
{
    struct emx_server *s = ctx;
    struct pipe_ctx *pc = p->conn;
    if (!pc || !pc->conn)
        return -ENOTCONN;
    int rc = s->tp->send(pc->conn, buf, len);
    if (rc == 0)
        pipe_mark_dirty(pc);
    return rc;
}

static void io_pipe_close(void *ctx, struct emx_pipe *p, const char *reason)
{
    struct emx_server *s = ctx;
    struct pipe_ctx *pc = p->conn;
    if (pc && pc->conn)
        s->tp->close(pc->conn, 1000, reason);
}

static void io_instance_added(void *ctx, struct emx_instance *inst)
{
    struct emx_server *s = ctx;
    for (unsigned i = 0; i < inst->npipes; i++) {
        struct pipe_ctx *pc = emx_calloc(1, sizeof(*pc));
        if (!pc) {
            emx_logf(&s->log, EMX_LOG_ERROR, "pipe", "out of memory for instance %s", inst->id);
            continue;
        }
        pc->s = s;
        pc->p = &inst->pipes[i];
        emx_list_init(&pc->dirty_link);
        emx_list_init(&pc->wait_link);
        uv_timer_init(&s->loop, &pc->retry);
        pc->retry.data = pc;
        inst->pipes[i].conn = pc;
        /* Spread the first connects a little so N pipes do not land at once. */
        uv_timer_start(&pc->retry, on_retry, i * 10, 0);
    }
}

static void io_instance_removed(void *ctx, struct emx_instance *inst)
{
    struct emx_server *s = ctx;
    for (unsigned i = 0; i < inst->npipes; i++) {
        struct pipe_ctx *pc = inst->pipes[i].conn;
        if (!pc)
            continue;
        pc->p = NULL;
        inst->pipes[i].conn = NULL;
        pipe_unqueue(pc);
        if (pc->dirty) {
            pc->dirty = false;
            emx_list_unlink(&pc->dirty_link);
        }
        if (pc->conn)
            s->tp->close(pc->conn, 1001, "instance removed");
        uv_close((uv_handle_t *)&pc->retry, retry_closed);
    }
    /* tunnels cannot move: the ones it owned end now */
    size_t n = emx_relays_close_owner(&s->relays, inst->id, 1001, "tunnel owner removed");
    if (n)
        emx_logf(&s->log, EMX_LOG_INFO, "tunnel", "instance %s removed: closing %zu tunnel(s)",
                 inst->id, n);
}

/* After each loop iteration: tell the router what the pipes really hold. */
static void on_check(uv_check_t *c)
{
    struct emx_server *s = c->data;
    uint64_t now = now_ms(s);
    while (!emx_list_empty(&s->dirty)) {
        struct pipe_ctx *pc = emx_container_of(s->dirty.next, struct pipe_ctx, dirty_link);
        emx_list_unlink(&pc->dirty_link);
        pc->dirty = false;
        if (pc->p && pc->conn)
            emx_router_pipe_queued(s->router, pc->p, s->tp->buffered(pc->conn), now);
    }
}

static void on_queued_timer(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    for (struct emx_instance *inst = emx_router_instance_next(s->router, NULL); inst;
         inst = emx_router_instance_next(s->router, inst))
        for (unsigned i = 0; i < inst->npipes; i++) {
            struct pipe_ctx *pc = inst->pipes[i].conn;
            if (pc && pc->conn && inst->pipes[i].wm.queued > 0)
                pipe_mark_dirty(pc);
        }
}

static void retire_step(struct emx_server *s);

static void on_tick(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    emx_router_tick(s->router, now_ms(s));
    emx_status_track(&s->status, s->router, now_ms(s), wall_ms());
    if (s->disc_retired && ++s->retire_ticks >= RETIRE_EVERY_TICKS) {
        s->retire_ticks = 0;
        retire_step(s);
    }
}

/* Pipes connected in every worker (worker 0, isolated or one worker). */
static unsigned pipes_up_all(struct emx_server *s)
{
    struct emx_proc *P = s->proc;
    unsigned n = 0;
    for (unsigned k = 0; k < P->n; k++)
        n += emx_router_pipes_up(P->w[k]->router);
    return n;
}

/* The process is ready while any worker has a connected pipe. */
static bool admin_ready(void *ctx)
{
    struct emx_server *s = ctx;
    if (s->stopping)
        return false;
    workers_isolate(s);
    bool ready = pipes_up_all(s) > 0;
    workers_release(s);
    return ready;
}

/* ------------------------------------------------------------------ */
/* operations: the agent's weight, the admin API */

/* The weight HAProxy gives this edgemux, in percent (docs/operations.md):
 * 100 scaled by the room left under edge.max_connections (when set) and by
 * the share of connected pipes that are writable; at least 1 while ready;
 * 0 (drain) while no pipe is connected or during a SIGTERM drain. */
static unsigned agent_weight_isolated(struct emx_server *s)
{
    struct emx_proc *P = s->proc;
    if (s->stopping || pipes_up_all(s) == 0)
        return 0;
    double w = 100.0;
    if (s->cfg->edge.max_connections > 0) {
        double used = (double)atomic_load_explicit(&P->edges, memory_order_relaxed) /
                      (double)s->cfg->edge.max_connections;
        w *= used >= 1.0 ? 0.0 : 1.0 - used;
    }
    unsigned up = 0, writable = 0;
    uint64_t now = now_ms(s);
    for (unsigned k = 0; k < P->n; k++) {
        struct emx_router *r = P->w[k]->router;
        for (struct emx_instance *inst = emx_router_instance_next(r, NULL); inst;
             inst = emx_router_instance_next(r, inst))
            for (unsigned i = 0; i < inst->npipes; i++)
                if (inst->pipes[i].state == EMX_PIPE_UP) {
                    up++;
                    writable += emx_pipe_is_writable(r, &inst->pipes[i], now);
                }
    }
    if (up)
        w = w * writable / up;
    unsigned pct = (unsigned)(w + 0.5);
    return pct < 1 ? 1 : pct > 100 ? 100 : pct;
}

static unsigned agent_weight(struct emx_server *s)
{
    workers_isolate(s);
    unsigned w = agent_weight_isolated(s);
    workers_release(s);
    return w;
}

static void agent_line(void *ctx, char *buf, size_t cap)
{
    struct emx_server *s = ctx;
    unsigned w = agent_weight(s);
    if (w == 0)
        snprintf(buf, cap, "drain\n");
    else
        snprintf(buf, cap, "ready %u%%\n", w);
}

/* Worker 0, isolated: every worker's counters added up, and each one's. */
struct ops_sums {
    struct emx_server_counters total;
    const struct emx_server_counters *each[EMX_WORKERS_MAX];
    struct emx_router *routers[EMX_WORKERS_MAX];
    const struct emx_relays *relays[EMX_WORKERS_MAX];
    struct emx_relays relays_sum; /* counts only (nopen, n, st): the metrics */
};

static void ops_sums(struct emx_server *s, struct ops_sums *o)
{
    struct emx_proc *P = s->proc;
    memset(o, 0, sizeof(*o));
    for (unsigned k = 0; k < P->n; k++) {
        const struct emx_server_counters *c = &P->w[k]->counters;
        o->each[k] = c;
        o->routers[k] = P->w[k]->router;
        const struct emx_relays *rl = &P->w[k]->relays;
        o->relays[k] = rl;
        o->relays_sum.n += rl->n;
        for (unsigned i = 0; i < EMX_RELAY_SIDES; i++)
            o->relays_sum.nopen[i] += rl->nopen[i];
        _Static_assert(sizeof(struct emx_relay_stats) % sizeof(uint64_t) == 0,
                       "emx_relay_stats holds uint64_t fields only");
        uint64_t src[sizeof(struct emx_relay_stats) / sizeof(uint64_t)],
            dst[sizeof(struct emx_relay_stats) / sizeof(uint64_t)];
        struct emx_relay_stats now;
        emx_relays_stats_now(rl, &now); /* open tunnels' bytes too */
        memcpy(src, &now, sizeof(src));
        memcpy(dst, &o->relays_sum.st, sizeof(dst));
        for (size_t i = 0; i < sizeof(src) / sizeof(src[0]); i++)
            dst[i] += src[i];
        memcpy(&o->relays_sum.st, dst, sizeof(dst));
        for (unsigned i = 0; i < EMX_REFUSE__COUNT; i++)
            o->total.refused[i] += c->refused[i];
        o->total.forwarded_for += c->forwarded_for;
        o->total.reloads_ok += c->reloads_ok;
        o->total.reloads_failed += c->reloads_failed;
        o->total.edges_kicked += c->edges_kicked;
        o->total.handed_in += c->handed_in;
        o->total.sockets += c->sockets;
    }
}

static void ops_view(struct emx_server *s, struct emx_ops_view *v)
{
    v->counters = &s->counters;
    v->worker_counters = NULL;
    v->discovery_plugin = s->dp && s->dp->hdr.name ? s->dp->hdr.name : "unknown";
    v->ready = admin_ready(s);
    v->draining = s->stopping;
    v->agent_weight = agent_weight(s);
    v->start_ms = s->start_ms;
    v->relays = &s->relays;
}

static void admin_text(struct emx_admin_response *resp, int status, const char *msg)
{
    resp->status = status;
    emx_textbuf_puts(&resp->body, msg);
}

/* "/edges/<id>/close": ids are shown in hex (endpointIdHex) and decimal;
 * both are accepted ("0x…" or 8 hex digits, or decimal). */
static bool parse_endpoint(const char *text, size_t len, uint32_t *out)
{
    char buf[16];
    if (len == 0 || len >= sizeof(buf))
        return false;
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *end;
    unsigned long v;
    if (len > 2 && buf[0] == '0' && (buf[1] == 'x' || buf[1] == 'X'))
        v = strtoul(buf + 2, &end, 16);
    else if (len == 8)
        v = strtoul(buf, &end, 16);
    else
        v = strtoul(buf, &end, 10);
    if (*end || buf[0] == '-' || buf[0] == '+' || v == 0 || v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

static void admin_edges(struct emx_server *s, const struct emx_admin_request *req,
                        struct emx_admin_response *resp)
{
    char thing[256], ep[32];
    uint32_t endpoint = 0;
    bool has_thing = emx_admin_query_get(req->query, "thing", thing, sizeof(thing));
    if (emx_admin_query_get(req->query, "endpoint", ep, sizeof(ep)) &&
        !parse_endpoint(ep, strlen(ep), &endpoint)) {
        admin_text(resp, 400, "bad endpoint id\n");
        return;
    }
    struct ops_sums o;
    ops_sums(s, &o);
    resp->status = 200;
    resp->content_type = "application/json";
    emx_ops_edges_json_n(&resp->body, o.routers, s->proc->n, has_thing ? thing : NULL, endpoint,
                         EDGES_LIST_LIMIT, now_ms(s));
}

/* An admin action for another worker: run there, after the isolation. */
struct admin_job {
    struct emx_server *s;
    uint32_t endpoint;
    uint16_t code;
    bool on;
    char text[256]; /* the close reason, or the instance id */
};

static void admin_job_close(void *arg)
{
    struct admin_job *j = arg;
    struct emx_edge *e = emx_router_edge_find(j->s->router, j->endpoint);
    if (e && e->state != EMX_EDGE_CLOSING)
        emx_router_edge_close(j->s->router, e, j->code, j->text);
    free(j);
}

static void admin_job_maintenance(void *arg)
{
    struct admin_job *j = arg;
    (void)emx_router_instance_maintenance(j->s->router, j->text, j->on, now_ms(j->s));
    free(j);
}

static void admin_post(struct emx_server *to, void (*fn)(void *), const struct admin_job *tmpl)
{
    struct admin_job *j = malloc(sizeof(*j)); /* freed by the job, on that worker */
    if (!j)
        return;
    *j = *tmpl;
    j->s = to;
    if (worker_post(to, fn, j) != 0)
        free(j);
}

/* POST /edges/ID/close[?code=1008|1001&reason=text] */
static void admin_edge_close(struct emx_server *s, const char *id, size_t idlen,
                             const struct emx_admin_request *req, struct emx_admin_response *resp)
{
    uint32_t endpoint;
    if (!parse_endpoint(id, idlen, &endpoint)) {
        admin_text(resp, 400, "bad endpoint id\n");
        return;
    }
    /* the top bits of an endpointId name the worker that holds the edge */
    unsigned wk = s->proc->n > 1 ? endpoint >> EMX_WORKER_SHIFT : 0;
    struct emx_server *ws = wk < s->proc->n ? s->proc->w[wk] : NULL;
    struct emx_edge *e = ws ? emx_router_edge_find(ws->router, endpoint) : NULL;
    if (!e) {
        admin_text(resp, 404, "no such edge\n");
        return;
    }
    char code_s[8] = "1008", reason[124] = "closed by operator";
    emx_admin_query_get(req->query, "code", code_s, sizeof(code_s));
    if (!emx_admin_query_get(req->query, "reason", reason, sizeof(reason)))
        snprintf(reason, sizeof(reason), "closed by operator");
    uint16_t code = strcmp(code_s, "1001") == 0 ? 1001 : strcmp(code_s, "1008") == 0 ? 1008 : 0;
    if (!code) {
        admin_text(resp, 400, "code must be 1008 or 1001\n");
        return;
    }
    if (e->state == EMX_EDGE_CLOSING) {
        admin_text(resp, 409, "edge already closing\n");
        return;
    }
    s->counters.edges_kicked++;
    emx_logf(&s->log, EMX_LOG_INFO, "admin", "closing edge %08" PRIx32 " (%s) on request: %u",
             e->id, e->addr, code);
    status_event(s, EMX_EV_ADMIN, "edge %08" PRIx32 " (%s) closed by an operator (%u)", e->id,
                 e->addr, code);
    if (ws == s) {
        emx_router_edge_close(s->router, e, code, reason);
    } else {
        struct admin_job j = {.endpoint = endpoint, .code = code};
        snprintf(j.text, sizeof(j.text), "%s", reason);
        admin_post(ws, admin_job_close, &j);
    }
    resp->status = 202;
    emx_textbuf_puts(&resp->body, "closing\n");
}

/* POST|PUT /instances/ID/maintenance[?on=0]; DELETE …/maintenance */
static void admin_maintenance(struct emx_server *s, const char *id,
                              const struct emx_admin_request *req, struct emx_admin_response *resp)
{
    bool on;
    char v[8];
    if (strcmp(req->method, "DELETE") == 0) {
        on = false;
    } else if (strcmp(req->method, "POST") == 0 || strcmp(req->method, "PUT") == 0) {
        on = true;
        if (emx_admin_query_get(req->query, "on", v, sizeof(v))) {
            if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0 || strcmp(v, "off") == 0)
                on = false;
            else if (strcmp(v, "1") && strcmp(v, "true") && strcmp(v, "on")) {
                admin_text(resp, 400, "on must be 0 or 1\n");
                return;
            }
        }
    } else {
        admin_text(resp, 405, "use POST or DELETE\n");
        return;
    }
    if (emx_router_instance_maintenance(s->router, id, on, now_ms(s)) != 0) {
        admin_text(resp, 404, "no such instance\n");
        return;
    }
    /* every worker routes to the instance: each one stops */
    struct admin_job j = {.on = on};
    snprintf(j.text, sizeof(j.text), "%s", id);
    for (unsigned k = 1; k < s->proc->n; k++)
        admin_post(s->proc->w[k], admin_job_maintenance, &j);
    emx_logf(&s->log, EMX_LOG_INFO, "admin", "instance %s: maintenance %s on request", id,
             on ? "on" : "off");
    status_event(s, EMX_EV_ADMIN, "instance %s: maintenance %s by an operator", id,
                 on ? "on" : "off");
    resp->status = 200;
    resp->content_type = "application/json";
    emx_textbuf_puts(&resp->body, "{\"instance\":");
    emx_textbuf_json_str(&resp->body, id);
    emx_textbuf_printf(&resp->body, ",\"maintenance\":%s}\n", on ? "true" : "false");
}

/* ---- the status page ---- */

#define TOP_SOURCES 10

static const char *status_pipe_error(void *ctx, const struct emx_pipe *p, uint64_t *at)
{
    (void)ctx;
    const struct pipe_ctx *pc = p->conn;
    if (!pc || !pc->last_reason[0])
        return NULL;
    *at = pc->last_fail_ms;
    return pc->last_reason;
}

/* The addresses with the most devices, the largest first. */
static size_t top_sources(struct emx_server *s, struct emx_status_source *out, size_t cap,
                          size_t *total)
{
    size_t n = 0;
    *total = 0;
    /* Worker 0 holds src_mu while the page is built (emx_status_html reads
     * the addresses): admin_status takes it. */
    for (struct source_count *sc = s->proc->sources; sc; sc = sc->hh.next) {
        if (sc->n == 0)
            continue; /* an address with tunnel sockets only */
        (*total)++;
        size_t i;
        if (n < cap)
            i = n++;
        else if (sc->n > out[cap - 1].n)
            i = cap - 1;
        else
            continue;
        for (; i > 0 && out[i - 1].n < sc->n; i--)
            out[i] = out[i - 1];
        out[i] = (struct emx_status_source){.addr = sc->addr, .n = sc->n};
    }
    return n;
}

/* Scripts from the admin port itself only, none inline: a string that got
 * past the escaping still could not run. */
#define STATUS_HEADERS                                                                             \
    "Content-Security-Policy: default-src 'none'; script-src 'self'; connect-src 'self'; "         \
    "style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'; form-action 'none'; "             \
    "frame-ancestors 'none'\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"

static void admin_status(struct emx_server *s, struct emx_admin_response *resp)
{
    uint64_t now = now_ms(s);
    int64_t wall = wall_ms();
    emx_status_track(&s->status, s->router, now, wall);
    struct emx_ops_view ov;
    struct ops_sums o;
    ops_view(s, &ov);
    ops_sums(s, &o);
    ov.counters = &o.total;
    ov.relays = &o.relays_sum; /* every worker's tunnel sockets, with open ones' bytes */
    struct emx_status_source top[TOP_SOURCES];
    size_t total;
    pthread_mutex_lock(&s->proc->src_mu);
    size_t ntop = top_sources(s, top, TOP_SOURCES, &total);
    struct emx_status_view v = {
        .ops = &ov,
        .server_name = s->cfg->server.name,
        .version = EMX_VERSION,
        .workers = s->cfg->server.workers,
        .max_pending = (uint32_t)s->cfg->edge.max_pending,
        .wall_ms = wall,
        .actions_on = s->actions_on,
        .sources = top,
        .nsources = ntop,
        .sources_total = total,
        .pipe_error = status_pipe_error,
        .ctx = s,
    };
    resp->status = 200;
    resp->content_type = "text/html; charset=utf-8";
    resp->headers = STATUS_HEADERS;
    /* every worker's routers and statuses: they are parked (admin_handle) */
    const struct emx_status *sts[EMX_WORKERS_MAX];
    for (unsigned k = 0; k < s->proc->n; k++)
        sts[k] = &s->proc->w[k]->status;
    emx_status_html_n(&resp->body, o.routers, sts, s->proc->n, &v, now);
    pthread_mutex_unlock(&s->proc->src_mu);
}

static void admin_handle_isolated(struct emx_server *s, const struct emx_admin_request *req,
                                  struct emx_admin_response *resp)
{
    bool get = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
    const char *path = req->path;
    if (strcmp(path, "/") == 0 || strcmp(path, "/status") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        admin_status(s, resp);
    } else if (strcmp(path, "/status.js") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        resp->status = 200;
        resp->content_type = "text/javascript; charset=utf-8";
        emx_textbuf_puts(&resp->body, emx_status_js);
    } else if (strcmp(path, "/metrics") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        struct emx_ops_view v;
        struct ops_sums o;
        ops_view(s, &v);
        ops_sums(s, &o);
        v.counters = &o.total;
        v.worker_counters = o.each;
        v.relays = &o.relays_sum;
        resp->status = 200;
        resp->content_type = "text/plain; version=0.0.4; charset=utf-8";
        emx_ops_metrics_n(&resp->body, o.routers, s->proc->n, &v, now_ms(s));
    } else if (strcmp(path, "/instances") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        struct ops_sums o;
        ops_sums(s, &o);
        resp->status = 200;
        resp->content_type = "application/json";
        emx_ops_instances_json_n(&resp->body, o.routers, s->proc->n, now_ms(s));
    } else if (strcmp(path, "/edges") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        admin_edges(s, req, resp);
    } else if (strcmp(path, "/tunnels") == 0) {
        if (!get)
            return admin_text(resp, 405, "use GET\n");
        struct ops_sums o;
        ops_sums(s, &o);
        resp->status = 200;
        resp->content_type = "application/json";
        emx_ops_tunnels_json_n(&resp->body, o.routers, o.relays, s->proc->n, EDGES_LIST_LIMIT,
                               now_ms(s));
    } else if (strncmp(path, "/edges/", 7) == 0) {
        const char *id = path + 7;
        const char *slash = strchr(id, '/');
        if (!slash || strcmp(slash, "/close") != 0)
            return admin_text(resp, 404, "not found\n");
        if (strcmp(req->method, "POST") != 0)
            return admin_text(resp, 405, "use POST\n");
        admin_edge_close(s, id, (size_t)(slash - id), req, resp);
    } else if (strncmp(path, "/instances/", 11) == 0) {
        char id[256];
        const char *start = path + 11;
        const char *slash = strrchr(start, '/');
        if (!slash || slash == start || strcmp(slash, "/maintenance") != 0 ||
            (size_t)(slash - start) >= sizeof(id))
            return admin_text(resp, 404, "not found\n");
        memcpy(id, start, (size_t)(slash - start));
        id[slash - start] = '\0';
        admin_maintenance(s, id, req, resp);
    }
}

/* Every admin request sees one moment of every worker: they are parked
 * while it is answered (a no-op with one worker). */
static void admin_handle(void *ctx, const struct emx_admin_request *req,
                         struct emx_admin_response *resp)
{
    struct emx_server *s = ctx;
    workers_isolate(s);
    admin_handle_isolated(s, req, resp);
    workers_release(s);
}

/* ------------------------------------------------------------------ */
/* start and stop */

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    (void)h;
}

static void finish_shutdown(struct emx_server *s)
{
    if (s->finished)
        return;
    s->finished = true;
    uv_timer_stop(&s->shutdown_timer);
    uv_close((uv_handle_t *)&s->shutdown_timer, NULL);
    uv_close((uv_handle_t *)&s->tick, NULL);
    uv_close((uv_handle_t *)&s->queued_timer, NULL);
    uv_close((uv_handle_t *)&s->check, NULL);
    if (s->worker == 0) { /* the process-wide parts: the others have ended */
        emx_notify_watchdog_stop();
        uv_close((uv_handle_t *)&s->sigterm, NULL);
        uv_close((uv_handle_t *)&s->sigint, NULL);
        uv_close((uv_handle_t *)&s->sighup, NULL);
        emx_admin_stop(s->admin);
        s->admin = NULL;
        emx_agent_stop(s->agent);
        s->agent = NULL;
    }
    if (s->listener) {
        s->tp->unlisten(s->listener);
        s->listener = NULL;
    }
    /* Pipes: drop every instance's connections. */
    for (struct emx_instance *inst = emx_router_instance_next(s->router, NULL); inst;
         inst = emx_router_instance_next(s->router, inst))
        io_instance_removed(s, inst);
    if (s->discovery_started)
        s->dp->stop(s->dinst);
    s->discovery_started = false;
    /* Posts accepted so far still run (a plugin frees what it posted in its
     * callback); later ones are refused and stay with their plugin. */
    pthread_mutex_lock(&s->post_mu);
    s->post_closed = true;
    pthread_mutex_unlock(&s->post_mu);
    on_async(&s->async);
    uv_close((uv_handle_t *)&s->async, NULL);
    s->tp->stop(s->tinst);
    s->transport_running = false;
}

static uint64_t pending_on_pipes(struct emx_server *s)
{
    uint64_t n = 0;
    for (struct emx_instance *inst = emx_router_instance_next(s->router, NULL); inst;
         inst = emx_router_instance_next(s->router, inst))
        n += inst->pending;
    return n;
}

/* A due edge takes no new requests (the router answers them 0xA0) and is
 * closed by the router once nothing is in flight for it, or here at the
 * deadline. Without that, a busy device is never idle and loses answers. */
static bool drain_close_one(struct emx_server *s, uint32_t id, bool force)
{
    struct emx_edge *e = emx_router_edge_find(s->router, id);
    if (!e || e->state == EMX_EDGE_CLOSING)
        return true;
    if (force) {
        emx_router_edge_close(s->router, e, 1001, "server shutting down");
        return true;
    }
    emx_router_edge_drain(s->router, e, now_ms(s));
    return e->state == EMX_EDGE_CLOSING; /* else: wait for its answers */
}

/* SIGTERM drain, every DRAIN_STEP_MS: edges fall due evenly over
 * edge.drain_spread; a due edge with requests in flight waits for their
 * answers (at most platform.request_timeout past the spread); once every
 * edge is gone and the pipes hold nothing in flight, stop. */
static void on_drain_step(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    uint64_t now = now_ms(s);
    uint64_t spread = s->cfg->edge.drain_spread;
    uint64_t elapsed = now - s->drain_start;
    uint64_t answer_by = spread + s->cfg->platform.request_timeout;
    bool force = elapsed >= answer_by;
    size_t due = s->drain_n;
    if (spread > 0 && elapsed < spread)
        due = (size_t)((double)s->drain_n * (double)elapsed / (double)spread);
    /* ids [0, waiting) fell due earlier and still wait; compact as we go */
    size_t w = 0;
    for (size_t i = 0; i < s->drain_waiting; i++)
        if (!drain_close_one(s, s->drain_ids[i], force))
            s->drain_ids[w++] = s->drain_ids[i];
    for (; s->drain_idx < due; s->drain_idx++)
        if (!drain_close_one(s, s->drain_ids[s->drain_idx], force))
            s->drain_ids[w++] = s->drain_ids[s->drain_idx];
    s->drain_waiting = w;
    bool edges_done = s->drain_idx >= s->drain_n && w == 0 && emx_router_edge_count(s->router) == 0;
    /* Tunnels cannot move to another edgemux: they may finish until
     * edge.tunnel_drain_timeout, then they are closed. */
    uint64_t tunnel_by = s->cfg->edge.tunnel_drain_timeout;
    if (s->relays.n && elapsed >= tunnel_by) {
        size_t n = emx_relays_close_all(&s->relays, 1001, "server shutting down");
        if (n)
            emx_logf(&s->log, EMX_LOG_INFO, "server", "tunnel drain bound reached: closing %zu tunnel(s)",
                     n);
    }
    if (tunnel_by > answer_by)
        answer_by = tunnel_by;
    if (s->drain_done || s->force_stop) {
        /* worker 0: waiting for the other workers' drains */
    } else if (edges_done && pending_on_pipes(s) == 0 && s->relays.n == 0) {
        emx_logf(&s->log, EMX_LOG_INFO, "server", "drained in %" PRIu64 " ms", elapsed);
        s->drain_done = true;
    } else if (elapsed >= answer_by + DRAIN_SLACK_MS) {
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "drain bound reached: %zu edge(s) open, %" PRIu64
                 " request(s) in flight, %zu tunnel(s)",
                 emx_router_edge_count(s->router), pending_on_pipes(s), s->relays.n);
        s->drain_done = true;
    }
    /* Worker 0 keeps the admin port, the agent (drain) and the signals
     * until every other worker has ended: they drain on the same clock. */
    if ((s->drain_done || s->force_stop) && (s->worker != 0 || workers_others_done(s)))
        finish_shutdown(s);
}

static void begin_shutdown(struct emx_server *s, const char *why);

/* Worker 0's SIGTERM (or a second one) reaching another worker. */
struct shutdown_job {
    struct emx_server *s;
    char why[16];
};

static void shutdown_job_run(void *arg)
{
    struct shutdown_job *j = arg;
    begin_shutdown(j->s, j->why);
    free(j);
}

static void shutdown_fan_out(struct emx_server *s, const char *why)
{
    for (unsigned k = 1; k < s->proc->n; k++) {
        struct shutdown_job *j = malloc(sizeof(*j)); /* freed by the job */
        if (!j) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "out of memory stopping worker %u", k);
            continue;
        }
        j->s = s->proc->w[k];
        snprintf(j->why, sizeof(j->why), "%s", why);
        if (worker_post(j->s, shutdown_job_run, j) != 0)
            free(j);
    }
}

static void begin_shutdown(struct emx_server *s, const char *why)
{
    if (s->worker == 0)
        shutdown_fan_out(s, why);
    if (s->stopping) {
        /* A second signal: do not wait for the drain. */
        emx_logf(&s->log, EMX_LOG_WARN, "server", "%s during drain: stopping now", why);
        for (struct emx_edge *e = emx_router_edge_next(s->router, NULL); e;
             e = emx_router_edge_next(s->router, e))
            emx_router_edge_close(s->router, e, 1001, "server shutting down");
        emx_relays_close_all(&s->relays, 1001, "server shutting down");
        if (s->worker == 0 && !workers_others_done(s))
            s->force_stop = true; /* on_drain_step finishes once the others have */
        else
            finish_shutdown(s);
        return;
    }
    s->stopping = true; /* on_accept refuses, /ready 503, the agent says drain */
    status_event(s, EMX_EV_SERVER, "%s: draining %zu edge(s), then stopping", why,
                 emx_router_edge_count(s->router));
    if (s->worker == 0)
        emx_notify_stopping();
    size_t n = emx_router_edge_count(s->router);
    emx_logf(&s->log, EMX_LOG_INFO, "server",
             "%s: draining %zu edge(s) over %" PRIu64 " ms, then stopping", why, n,
             s->cfg->edge.drain_spread);
    s->drain_ids = n ? emx_calloc(n, sizeof(*s->drain_ids)) : NULL;
    size_t k = 0;
    if (s->drain_ids)
        for (struct emx_edge *e = emx_router_edge_next(s->router, NULL); e && k < n;
             e = emx_router_edge_next(s->router, e))
            s->drain_ids[k++] = e->id;
    else if (n)
        emx_logf(&s->log, EMX_LOG_WARN, "server", "out of memory: closing edges at once");
    s->drain_n = k;
    s->drain_idx = s->drain_waiting = 0;
    s->drain_start = now_ms(s);
    if (n && !s->drain_ids)
        for (struct emx_edge *e = emx_router_edge_next(s->router, NULL); e;
             e = emx_router_edge_next(s->router, e))
            emx_router_edge_close(s->router, e, 1001, "server shutting down");
    uv_timer_start(&s->shutdown_timer, on_drain_step, 0, DRAIN_STEP_MS);
}

/* ------------------------------------------------------------------ */
/* SIGHUP: reload the configuration in place */

static bool str_same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool node_same(const struct emx_node *a, const struct emx_node *b)
{
    if (!a || !b)
        return a == b;
    if (a->kind != b->kind || !str_same(a->key, b->key) || !str_same(a->value, b->value) ||
        a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++)
        if (!node_same(&a->children[i], &b->children[i]))
            return false;
    return true;
}

/* Keys the running process cannot change: log each one that changed. */
static unsigned report_restart_keys(struct emx_server *s, const struct emx_config *o,
                                    const struct emx_config *n)
{
    unsigned k = 0;
#define RESTART_IF(cond, key)                                                                      \
    do {                                                                                           \
        if (cond) {                                                                                \
            emx_logf(&s->log, EMX_LOG_WARN, "server",                                              \
                     "reload: %s changed: needs a restart; not applied", key);                     \
            k++;                                                                                   \
        }                                                                                          \
    } while (0)
    RESTART_IF(!str_same(o->server.name, n->server.name), "server.name");
    RESTART_IF(o->server.workers != n->server.workers, "server.workers");
    RESTART_IF(!str_same(o->server.user, n->server.user), "server.user");
    RESTART_IF(!str_same(o->plugins.dir, n->plugins.dir), "plugins.dir");
    RESTART_IF(!str_same(o->edge.address, n->edge.address), "edge.address");
    RESTART_IF(o->edge.port != n->edge.port, "edge.port");
    RESTART_IF(!str_same(o->edge.path, n->edge.path), "edge.path");
    RESTART_IF(o->edge.max_message_size != n->edge.max_message_size, "edge.max_message_size");
    RESTART_IF(o->edge.max_preauth_message != n->edge.max_preauth_message,
               "edge.max_preauth_message");
    RESTART_IF(o->edge.deflate != n->edge.deflate, "edge.deflate");
    RESTART_IF(o->edge.idle_timeout != n->edge.idle_timeout, "edge.idle_timeout");
    RESTART_IF(o->edge.tls_client_cert != n->edge.tls_client_cert, "edge.tls_client_cert");
    /* A rotated certificate and key are reloaded in place (reload_edge_tls);
     * turning TLS on or off, or changing who may present client
     * certificates, needs a new listener. */
    RESTART_IF(!o->edge.tls_cert != !n->edge.tls_cert, "edge.tls_cert (TLS on or off)");
    RESTART_IF(!str_same(o->edge.tls_ca, n->edge.tls_ca), "edge.tls_ca");
    RESTART_IF(o->platform.pipes_per_instance != n->platform.pipes_per_instance,
               "platform.pipes_per_instance");
    RESTART_IF(!str_same(o->admin.listen, n->admin.listen), "admin.listen");
    RESTART_IF(!str_same(o->admin.agent_listen, n->admin.agent_listen), "admin.agent_listen");
    RESTART_IF(!str_same(o->transport.plugin, n->transport.plugin) ||
                   !node_same(o->transport.node, n->transport.node),
               "transport");
#undef RESTART_IF
    return k;
}

static struct emx_router_config router_config(const struct emx_setup *st, struct emx_proc *P);
static int make_header(char **out, const char *name, const char *value);

/* SIGHUP with TLS on the edge listener: read the certificate and key again
 * (a rotated certificate usually keeps its path), keeping every device. */
static void reload_edge_tls(struct emx_server *s, const struct emx_config *n)
{
    if (!n->edge.tls_cert || !s->listener)
        return;
    const struct emx_transport_plugin *tp = s->tp;
    if (tp->hdr.struct_size < offsetof(struct emx_transport_plugin, reload_tls) +
                                  sizeof(tp->reload_tls) ||
        !tp->reload_tls) {
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "reload: the transport cannot reload its certificate; restart to use a new one");
        return;
    }
    int rc = tp->reload_tls(s->listener, n->edge.tls_cert, n->edge.tls_key);
    if (rc == 0)
        emx_logf(&s->log, EMX_LOG_INFO, "server", "reload: edge TLS certificate read from %s",
                 n->edge.tls_cert);
    else if (rc == -ENOTSUP)
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "reload: edge.tls_cert/tls_key moved to other files: needs a restart; the "
                 "running certificate stays");
    else
        emx_logf(&s->log, EMX_LOG_ERROR, "server",
                 "reload: edge TLS certificate not reloaded (%s); the running one stays",
                 strerror(-rc));
}

static void gen_release(struct emx_server *s, struct setup_gen *gen)
{
    if (!gen || --gen->users > 0)
        return;
    for (struct setup_gen **pp = &s->setups; *pp; pp = &(*pp)->next)
        if (*pp == gen) {
            *pp = gen->next;
            break;
        }
    emx_setup_free(&gen->setup);
    emx_free(gen);
}

/* Drop what a discovery instance held: its host table, its config and so
 * its plugin reference (the start-up setup's plugin for the first one). */
static void disc_unload(struct emx_server *s, struct disc_gen *g)
{
    if (g->gen)
        gen_release(s, g->gen);
    else
        emx_setup_drop_discovery(s->setup);
    emx_free(g);
}

static void disc_retire(struct emx_server *s, struct disc_gen *g, enum disc_state state)
{
    g->state = state;
    g->next = s->disc_retired;
    s->disc_retired = g;
    s->retire_ticks = 0;
}

/* Replaced discovery instances go in two steps, each only when the loop has
 * no request in flight (thread-pool work such as a ZooKeeper close, a file
 * read, a resolution: any of them may call back into the plugin's code):
 * posts queued so far run, then destroy; one step later, with destroy's
 * close callbacks run too, the plugin reference is dropped and dlclose may
 * unmap its code. The loop always gets quiet between bursts; until then
 * the plugin stays loaded, which is safe. */
static void retire_step(struct emx_server *s)
{
    if (s->loop.active_reqs.count != 0)
        return;
    on_async(&s->async);
    for (struct disc_gen **pp = &s->disc_retired; *pp;) {
        struct disc_gen *g = *pp;
        if (g->state == DISC_STOPPED) {
            g->dp->destroy(g->dinst);
            g->state = DISC_DESTROYED;
            pp = &g->next;
        } else {
            *pp = g->next;
            emx_logf(&s->log, EMX_LOG_DEBUG, "server", "%s unloaded", g->tag);
            disc_unload(s, g);
        }
    }
}

/* Swap discovery: start an instance from the new config first, and only
 * once it runs stop the old one (its later posts are ignored). If the new
 * one cannot start, the old one keeps running. The router keeps its
 * instances until the new source reports. */
static int reload_discovery(struct emx_server *s, struct setup_gen *gen)
{
    struct emx_setup *ns = &gen->setup;
    struct disc_gen *g = emx_calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    snprintf(g->tag, sizeof(g->tag), "discovery:%s.%u", ns->discovery->hdr->name,
             (unsigned)(s->counters.reloads_ok + 1));
    host_init(s, &g->host, g->tag);
    g->gen = gen;
    gen->users++;
    g->dp = ns->discovery->u.discovery;
    int rc = g->dp->create(&g->host, ns->discovery_config, &g->dinst);
    if (rc != 0) {
        disc_unload(s, g);
        return rc;
    }
    const struct emx_host *prev_active = s->dhost_active;
    s->dhost_active = &g->host; /* its reports count from its start on */
    rc = g->dp->start(g->dinst);
    if (rc != 0) {
        s->dhost_active = prev_active;
        /* Its host table stays until the loop holds nothing of it. */
        disc_retire(s, g, DISC_STOPPED);
        return rc;
    }
    /* The new source runs: retire the old one. */
    if (s->discovery_started)
        s->dp->stop(s->dinst);
    disc_retire(s, s->disc, DISC_STOPPED);
    s->disc = g;
    s->dp = g->dp;
    s->dinst = g->dinst;
    s->discovery_started = true;
    return 0;
}

/* Plugins loaded now, for a reload to share instead of opening again. */
static size_t loaded_plugins(struct emx_server *s, struct emx_plugin **out, size_t cap)
{
    size_t n = 0;
    struct emx_plugin *first[2] = {s->setup->transport, s->setup->discovery};
    for (size_t i = 0; i < 2; i++)
        if (first[i] && n < cap)
            out[n++] = first[i];
    for (struct setup_gen *g = s->setups; g; g = g->next) {
        if (g->setup.transport && n < cap)
            out[n++] = g->setup.transport;
        if (g->setup.discovery && n < cap)
            out[n++] = g->setup.discovery;
    }
    return n;
}

#define LOADED_MAX 64

/* A reload's limits and the edge certificate, applied on a worker's own
 * loop. rc.app_key points into the running configuration: the job runs
 * before the worker can be parked for the next reload, which is the only
 * thing that frees it. */
struct reload_job {
    struct emx_server *s;
    struct emx_router_config rc;
};

static void reload_worker_apply(struct emx_server *s, const struct emx_router_config *rc)
{
    if (emx_router_set_config(s->router, rc, now_ms(s)) != 0)
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "reload: out of memory applying limits");
    reload_edge_tls(s, s->cfg);
}

static void reload_job_run(void *arg)
{
    struct reload_job *j = arg;
    if (!j->s->stopping)
        reload_worker_apply(j->s, &j->rc);
    free(j);
}

static void reload_config(struct emx_server *s)
{
    emx_notify_reloading();
    emx_logf(&s->log, EMX_LOG_INFO, "server", "SIGHUP: reloading %s", s->cfg->file);
    struct setup_gen *gen = emx_calloc(1, sizeof(*gen));
    struct emx_errors errs = {0};
    struct emx_plugin *loaded[LOADED_MAX];
    size_t nloaded = loaded_plugins(s, loaded, LOADED_MAX);
    int rc = gen ? emx_setup_load_shared(s->cfg->file, s->setup->plugins_dir, loaded, nloaded,
                                         &gen->setup, &errs)
                 : -ENOMEM;
    if (rc != 0) {
        for (size_t i = 0; i < errs.count; i++)
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "reload: %s", errs.msgs[i]);
        emx_logf(&s->log, EMX_LOG_ERROR, "server",
                 "reload refused (%zu error(s)); the running configuration stays", errs.count);
        status_event(s, EMX_EV_RELOAD, "reload refused (%zu error(s)): %s", errs.count,
                     errs.count ? errs.msgs[0] : "out of memory");
        emx_errors_free(&errs);
        emx_free(gen);
        s->counters.reloads_failed++;
        emx_notify_ready(NULL);
        return;
    }
    emx_errors_free(&errs);
    struct emx_setup *ns = &gen->setup;
    const struct emx_config *o = s->cfg, *n = ns->cfg;
    struct emx_cidr_list trusted;
    char why[128];
    if (emx_cidr_list_parse(n->edge.trusted_proxies.items, n->edge.trusted_proxies.count, &trusted,
                            why, sizeof(why)) != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "reload refused: edge.trusted_proxies: %s", why);
        status_event(s, EMX_EV_RELOAD, "reload refused: edge.trusted_proxies: %s", why);
        emx_setup_free(ns);
        emx_free(gen);
        s->counters.reloads_failed++;
        emx_notify_ready(NULL);
        return;
    }
    unsigned restart = report_restart_keys(s, o, n);
    bool disc_changed = s->discovery_stale || !str_same(o->discovery.plugin, n->discovery.plugin) ||
                        !node_same(o->discovery.node, n->discovery.node);

    /* Keys that need a restart keep their running values, so what the
     * process does matches what the log just said. */
    ((struct emx_config *)n)->edge.max_message_size = o->edge.max_message_size;

    /* From here on the new configuration is the running one. The transport
     * it names was only loaded to check its options: the running one stays. */
    emx_setup_drop_transport(ns);
    gen->next = s->setups;
    s->setups = gen;
    gen->users = 1;
    struct setup_gen *prev = NULL;
    for (struct setup_gen *g = gen->next; g && !prev; g = g->next)
        if (g->setup.cfg == o)
            prev = g;
    /* What every worker reads changes while they are parked; what changes
     * a worker's router or transport is posted to it. */
    struct emx_proc *P = s->proc;
    struct emx_router_config rc_new = router_config(ns, P);
    rc_new.pipes_per_instance = emx_router_config(s->router)->pipes_per_instance;
    workers_isolate(s);
    emx_cidr_list_free(&P->trusted);
    P->trusted = trusted;
    for (unsigned k = 0; k < P->n; k++) {
        struct emx_server *w = P->w[k];
        w->cfg = ns->cfg;
        emx_log_level_parse(n->log.level, &w->log.level);
        emx_log_format_parse(n->log.format, &w->log.format);
        char *hdr = NULL;
        if (make_header(&hdr, "appKey", ns->app_key) == 0) {
            /* new pipes authenticate with the new key; open ones stay */
            explicit_bzero(w->hdr_appkey, strlen(w->hdr_appkey));
            emx_free(w->hdr_appkey);
            w->hdr_appkey = hdr;
            w->pipe_headers[0] = hdr;
        }
    }
    workers_release(s);
    reload_worker_apply(s, &rc_new);
    for (unsigned k = 1; k < P->n; k++) {
        struct reload_job *j = malloc(sizeof(*j)); /* freed by the job */
        if (!j) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "reload: out of memory for worker %u", k);
            continue;
        }
        j->s = P->w[k];
        j->rc = rc_new;
        if (worker_post(j->s, reload_job_run, j) != 0)
            free(j);
    }
    if (disc_changed) {
        emx_logf(&s->log, EMX_LOG_INFO, "server", "reload: discovery changed: restarting %s",
                 ns->discovery->hdr->name);
        rc = reload_discovery(s, gen);
        s->discovery_stale = rc != 0;
        if (rc != 0)
            emx_logf(&s->log, EMX_LOG_ERROR, "server",
                     "reload: discovery %s failed to start (%s); the running source stays "
                     "and the next reload tries again",
                     ns->discovery->hdr->name, strerror(-rc));
    }
    /* No instance was made from it (discovery unchanged, or create failed):
     * its discovery plugin reference goes now. */
    if (gen->users == 1)
        emx_setup_drop_discovery(ns);
    gen_release(s, prev); /* no longer the running configuration */
    if (emx_admin_set_token(s->admin, ns->admin_token) == 0)
        s->actions_on = ns->admin_token != NULL;
    else
        emx_logf(&s->log, EMX_LOG_ERROR, "server",
                 "reload: out of memory for the admin token; the running one stays");
    s->counters.reloads_ok++;
    status_event(s, EMX_EV_RELOAD, "reload done%s; %u key(s) need a restart",
                 disc_changed ? ", discovery restarted" : "", restart);
    emx_logf(&s->log, EMX_LOG_INFO, "server",
             "reload done: limits, timeouts, watermarks and log settings applied%s; %u key(s) "
             "need a restart",
             disc_changed ? ", discovery restarted" : "", restart);
    emx_notify_ready(NULL);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    struct emx_server *s = sig->data;
    if (signum == SIGHUP) {
        if (!s->stopping)
            reload_config(s);
        return;
    }
    begin_shutdown(s, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* A reload reads the config, the app key file and the TLS files again, as
 * server.user (docs/operations.md): say now which of them it could not. */
static void warn_unreadable_after_drop(struct emx_server *s)
{
    const struct emx_config *c = s->cfg;
    const struct {
        const char *key, *path;
    } files[] = {
        {"config file", c->file},
        {"platform.app_key_file", c->platform.app_key_file},
        {"admin.token_file", c->admin.token_file},
        {"edge.tls_cert", c->edge.tls_cert},
        {"edge.tls_key", c->edge.tls_key},
        {"edge.tls_ca", c->edge.tls_ca},
        {"platform.tls_ca", c->platform.tls_ca},
        {"platform.tls_cert", c->platform.tls_cert},
        {"platform.tls_key", c->platform.tls_key},
    };
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++)
        if (files[i].path && access(files[i].path, R_OK) != 0)
            emx_logf(&s->log, EMX_LOG_WARN, "server",
                     "%s '%s' is not readable by %s (%s): a reload (SIGHUP) will fail; make it "
                     "readable by that user (for a secret: owner root, group of %s, mode 0640)",
                     files[i].key, files[i].path, c->server.user, strerror(errno), c->server.user);
}

static int make_header(char **out, const char *name, const char *value)
{
    size_t n = strlen(name) + strlen(value) + 3;
    *out = emx_malloc(n);
    if (!*out)
        return -ENOMEM;
    snprintf(*out, n, "%s: %s", name, value);
    return 0;
}

/* A worker's router settings. edge.max_memory is split evenly over the
 * workers; edge.max_tunnels bounds a count every worker adds to. */
static struct emx_router_config router_config(const struct emx_setup *st, struct emx_proc *P)
{
    unsigned workers = P->n;
    const struct emx_config *c = st->cfg;
    uint64_t nw = workers ? workers : 1;
    struct emx_router_config rc = {
        .worker = 0,
        .pipes_per_instance = (unsigned)c->platform.pipes_per_instance,
        .high_watermark = c->platform.high_watermark,
        .low_watermark = c->platform.low_watermark,
        .stall_after = c->platform.stall_after,
        .request_timeout = c->platform.request_timeout,
        .edge_request_timeout = c->edge.request_timeout,
        .auth_timeout = c->edge.auth_timeout,
        .multipart_pin_wait = c->platform.multipart_pin_wait,
        .all_down_grace = c->platform.all_down_grace,
        .close_spread = c->platform.close_spread,
        .empty_confirm = c->discovery.empty_confirm,
        .max_message_size = c->edge.max_message_size,
        .max_pending = (uint32_t)c->edge.max_pending,
        .max_msgs_per_sec = (uint32_t)c->edge.max_msgs_per_sec,
        .max_things = (uint32_t)c->edge.max_things,
        .max_bytes_in_flight = c->edge.max_bytes_in_flight,
        /* a default over a lowered max_queued follows it (config.c refuses
         * one the operator wrote) */
        .max_answer_backlog = c->edge.max_answer_backlog < c->edge.max_queued
                                  ? c->edge.max_answer_backlog
                                  : c->edge.max_queued / 2,
        .max_memory = c->edge.max_memory ? (c->edge.max_memory + nw - 1) / nw : 0,
        .max_tunnels = (uint32_t)c->edge.max_tunnels, /* the process's count: tunnels_shared */
        .tunnels_shared = workers > 1 ? &P->tunnels : NULL,
        .max_tunnels_per_device = (uint32_t)c->edge.max_tunnels_per_device,
        .tunnel_connect_timeout = c->edge.tunnel_connect_timeout,
        .app_key = st->app_key,
    };
    return rc;
}

/* Start-up failed or the loop ended early: close the handles the server
 * made itself so the loop can close. */
static void close_own_handles(struct emx_server *s)
{
    uv_handle_t *hs[] = {(uv_handle_t *)&s->tick,   (uv_handle_t *)&s->queued_timer,
                         (uv_handle_t *)&s->shutdown_timer, (uv_handle_t *)&s->check,
                         (uv_handle_t *)&s->async,  (uv_handle_t *)&s->sigterm,
                         (uv_handle_t *)&s->sigint, (uv_handle_t *)&s->sighup};
    /* only worker 0 has the signal handles */
    size_t n = s->worker == 0 ? sizeof(hs) / sizeof(hs[0]) : 5;
    for (size_t i = 0; i < n; i++)
        if (!uv_is_closing(hs[i]))
            uv_close(hs[i], NULL);
}

/* A tunnel record's claim or release, for another worker (tunnel_relay.h). */
struct tunnel_claim_job {
    struct emx_server *to;
    uint64_t key;
    bool claim;
    char *tid; /* both in this block */
    char *owner;
};

static void tunnel_claim_run(void *arg)
{
    struct tunnel_claim_job *j = arg;
    struct emx_router *r = j->to->router;
    if (j->claim)
        emx_router_tunnel_claim(r, j->tid, strlen(j->tid), j->owner, j->key);
    else
        emx_router_tunnel_release(r, j->tid, strlen(j->tid), j->key);
    free(j);
}

/* Tunnel sockets are few: every other worker is asked, the one holding the
 * record answers to the key. */
static void relay_elsewhere(void *ctx, const char *owner, const char *tid, uint64_t key, bool claim)
{
    struct emx_server *s = ctx;
    struct emx_proc *P = s->proc;
    size_t lt = strlen(tid) + 1, lo = strlen(owner) + 1;

    for (unsigned k = 0; k < P->n; k++) {
        if (k == s->worker)
            continue;
        struct tunnel_claim_job *j = malloc(sizeof(*j) + lt + lo); /* freed on worker k */
        if (!j) {
            emx_logf(&s->log, EMX_LOG_ERROR, "tunnel",
                     "out of memory telling worker %u of a tunnel socket", k);
            continue;
        }
        j->to = P->w[k];
        j->key = key;
        j->claim = claim;
        j->tid = (char *)(j + 1);
        j->owner = j->tid + lt;
        memcpy(j->tid, tid, lt);
        memcpy(j->owner, owner, lo);
        if (worker_post(P->w[k], tunnel_claim_run, j) != 0)
            free(j); /* that worker has stopped */
    }
}

/* One worker: its loop, handles, router and transport instance with its
 * edge listener, made on the main thread before any worker thread runs. */
static int worker_new(struct emx_proc *P, unsigned k, struct emx_setup *setup, uint64_t boot,
                      const char *boot_hex, struct emx_server **out)
{
    struct emx_server *s = emx_calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    *out = s;
    s->proc = P;
    s->worker = k;
    s->setup = setup;
    s->cfg = setup->cfg;
    s->tp = setup->transport->u.transport;
    s->dp = setup->discovery->u.discovery;
    emx_log_init(&s->log);
    emx_log_level_parse(s->cfg->log.level, &s->log.level);
    emx_log_format_parse(s->cfg->log.format, &s->log.format);
    s->log.worker = P->n > 1 ? (int)k : -1;
    emx_list_init(&s->dirty);
    emx_list_init(&s->connect_wait);
    pthread_mutex_init(&s->post_mu, NULL);
    s->post_tail = &s->post_head;
    s->rng = (boot ^ (0x9E3779B97F4A7C15ull * (k + 1))) | 1;
    snprintf(s->boot_hex, sizeof(s->boot_hex), "%s", boot_hex);
    /* The platform-hop identity (docs/protocol.md): the server name, and
     * with several workers "name/index", so a platform's request for an
     * edge comes back on a pipe of the worker that holds it. */
    char ident[300];
    if (P->n > 1)
        snprintf(ident, sizeof(ident), "%s/%u", s->cfg->server.name, k);
    else
        snprintf(ident, sizeof(ident), "%s", s->cfg->server.name);
    if (make_header(&s->hdr_appkey, "appKey", setup->app_key) ||
        make_header(&s->hdr_server, "X-Edgemux-Server", ident) ||
        make_header(&s->hdr_boot, "X-Edgemux-Boot", s->boot_hex))
        return -ENOMEM;
    s->pipe_headers[0] = s->hdr_appkey;
    s->pipe_headers[1] = s->hdr_server;
    s->pipe_headers[2] = s->hdr_boot;

    int rc = uv_loop_init(&s->loop);
    if (rc)
        return rc;
    s->loop_ok = true;
    uv_async_init(&s->loop, &s->async, on_async);
    s->async.data = s;
    uv_timer_init(&s->loop, &s->tick);
    s->tick.data = s;
    uv_timer_init(&s->loop, &s->queued_timer);
    s->queued_timer.data = s;
    uv_timer_init(&s->loop, &s->shutdown_timer);
    s->shutdown_timer.data = s;
    uv_check_init(&s->loop, &s->check);
    s->check.data = s;
    if (k == 0) {
        uv_signal_init(&s->loop, &s->sigterm);
        uv_signal_init(&s->loop, &s->sigint);
        uv_signal_init(&s->loop, &s->sighup);
        s->sigterm.data = s->sigint.data = s->sighup.data = s;
    }

    struct emx_router_config rcfg = router_config(setup, P);
    rcfg.worker = k;
    struct emx_router_io io = {
        .ctx = s,
        .log = &s->log,
        .edge_send = io_edge_send,
        .edge_close = io_edge_close,
        .edge_pause = io_edge_pause,
        .pipe_send = io_pipe_send,
        .pipe_close = io_pipe_close,
        .instance_added = io_instance_added,
        .instance_removed = io_instance_removed,
        .edge_authenticated = io_edge_authenticated,
        .edge_buffered = io_edge_buffered,
        .pipe_buffered = io_pipe_buffered,
    };
    s->router = emx_router_new(&rcfg, &io, uv_now(&s->loop));
    if (!s->router)
        return -ENOMEM;
    struct emx_relay_env renv = {
        .router = s->router,
        .log = &s->log,
        .tp = s->tp,
        .cfg = &s->cfg,
        .trusted = &P->trusted, /* replaced only while this worker is parked */
        .server_header = (const char *const *)&s->hdr_server,
        .stopping = &s->stopping,
        .now = relay_now,
        .now_ctx = s,
        .relays_shared = P->n > 1 ? &P->relays : NULL,
        .elsewhere = P->n > 1 ? relay_elsewhere : NULL,
        .source_take = source_take_tunnel,
        .source_give = source_give_tunnel,
        .source_ctx = s,
        .devices = &P->devices,
        .elsewhere_ctx = s,
        .worker = k,
    };
    emx_relays_init(&s->relays, &renv);
    s->relays_ok = true;

    snprintf(s->ttag, sizeof(s->ttag), "transport:%s.%u", setup->transport->hdr->name, k);
    host_init(s, &s->thost, s->ttag);
    s->start_ms = uv_now(&s->loop);
    emx_status_init(&s->status);
    s->status_ok = true;

    rc = s->tp->create(&s->thost, setup->transport_config, &s->tinst);
    if (rc == 0) {
        rc = s->tp->start(s->tinst);
        if (rc != 0) {
            s->tp->destroy(s->tinst); /* the ABI allows destroy after a failed start */
            s->tinst = NULL;
        }
    } else {
        s->tinst = NULL;
    }
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "transport %s failed to start (%s)",
                 setup->transport->hdr->name, strerror(-rc));
        return rc;
    }
    s->transport_running = true;
    if (strchr(s->cfg->edge.address, ':'))
        snprintf(s->listen_addr, sizeof(s->listen_addr), "[%s]:%" PRId64, s->cfg->edge.address,
                 s->cfg->edge.port);
    else
        snprintf(s->listen_addr, sizeof(s->listen_addr), "%s:%" PRId64, s->cfg->edge.address,
                 s->cfg->edge.port);
    struct emx_listen_spec ls = {
        .address = s->listen_addr,
        .path = s->cfg->edge.path,
        .tls_cert = s->cfg->edge.tls_cert,
        .tls_key = s->cfg->edge.tls_key,
        .tls_ca = s->cfg->edge.tls_ca,
        .tls_require_client_cert = s->cfg->edge.tls_client_cert,
        .max_message_size = s->cfg->edge.max_message_size,
        .idle_timeout_ms = s->cfg->edge.idle_timeout,
        .deflate = s->cfg->edge.deflate ? 1 : -1,
        .max_preauth_message = s->cfg->edge.max_preauth_message,
    };
    rc = s->tp->listen(s->tinst, &ls, &edge_callbacks, s, &s->listener);
    if (rc != 0) {
        s->listener = NULL;
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot listen on %s (%s)", s->listen_addr,
                 strerror(-rc));
        return rc;
    }
    return 0;
}

/* Free a worker on the main thread once its loop has ended (or never ran:
 * start-up failed). */
static void worker_free(struct emx_server *s)
{
    if (!s)
        return;
    if (s->loop_ok && !s->finished) {
        /* never ran to a shutdown: close what start-up opened */
        if (s->listener)
            s->tp->unlisten(s->listener);
        s->listener = NULL;
        if (s->transport_running)
            s->tp->stop(s->tinst);
        s->transport_running = false;
        close_own_handles(s);
        uv_run(&s->loop, UV_RUN_DEFAULT);
    }
    if (s->dinst)
        s->dp->destroy(s->dinst);
    for (struct disc_gen *g = s->disc_retired; g; g = g->next) /* replaced by reloads */
        if (g->state == DISC_STOPPED)
            g->dp->destroy(g->dinst);
    if (s->tinst)
        s->tp->destroy(s->tinst);
    if (s->relays_ok)
        emx_relays_free(&s->relays); /* the transport has ended every tunnel */
    emx_router_free(s->router);
    if (s->status_ok)
        emx_status_free(&s->status);
    emx_free_ptr(&s->drain_ids);
    emx_free_ptr(&s->disc);
    while (s->disc_retired) {
        struct disc_gen *g = s->disc_retired;
        s->disc_retired = g->next;
        emx_free(g);
    }
    while (s->setups) {
        struct setup_gen *g = s->setups;
        s->setups = g->next;
        emx_setup_free(&g->setup);
        emx_free(g);
    }
    if (s->loop_ok) {
        uv_walk(&s->loop, close_walk, NULL);
        if (uv_loop_close(&s->loop) != 0)
            emx_logf(&s->log, EMX_LOG_WARN, "server", "event loop closed with handles open");
    }
    emx_free(s->hdr_appkey ? (explicit_bzero(s->hdr_appkey, strlen(s->hdr_appkey)), s->hdr_appkey)
                           : NULL);
    emx_free(s->hdr_server);
    emx_free(s->hdr_boot);
    pthread_mutex_destroy(&s->post_mu);
    emx_free(s);
}

static void *worker_main(void *arg)
{
    struct emx_server *s = arg;
    struct emx_proc *P = s->proc;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    pthread_mutex_lock(&P->mu);
    P->done[s->worker] = true;
    pthread_cond_broadcast(&P->cond);
    pthread_mutex_unlock(&P->mu);
    return NULL;
}

/* Worker k's timers (worker 0 adds its signals and the watchdog). */
static void worker_start_timers(struct emx_server *s)
{
    uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
    uv_timer_start(&s->queued_timer, on_queued_timer, QUEUED_REFRESH_MS, QUEUED_REFRESH_MS);
    uv_check_start(&s->check, on_check);
}

int emx_server_run(struct emx_setup *setup)
{
    struct emx_proc *P = emx_calloc(1, sizeof(*P));
    if (!P)
        return -ENOMEM;
    int rc = 0;
    struct emx_log final_log; /* for the last line, after the workers are freed */
    emx_log_init(&final_log);
    P->n = setup->cfg->server.workers >= 1 && setup->cfg->server.workers <= EMX_WORKERS_MAX
               ? (unsigned)setup->cfg->server.workers
               : 1;
    pthread_mutex_init(&P->mu, NULL);
    pthread_cond_init(&P->cond, NULL);
    pthread_mutex_init(&P->src_mu, NULL);
    atomic_init(&P->edges, 0);
    atomic_init(&P->tunnels, 0);
    atomic_init(&P->relays, 0);
    emx_relay_device_set_init(&P->devices);
    for (unsigned k = 0; k < EMX_WORKERS_MAX; k++)
        atomic_init(&P->socks[k], 0);
    signal(SIGPIPE, SIG_IGN);

    uint64_t boot = 0;
    if (getrandom(&boot, sizeof(boot), 0) != (ssize_t)sizeof(boot))
        boot = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull ^ (uint64_t)time(NULL);
    char boot_hex[17];
    snprintf(boot_hex, sizeof(boot_hex), "%016" PRIx64, boot);

    /* Worker 0 first: it logs start-up problems for the process. */
    for (unsigned k = 0; k < P->n && rc == 0; k++)
        rc = worker_new(P, k, setup, boot, boot_hex, &P->w[k]);
    struct emx_server *s = P->w[0];
    if (rc != 0)
        goto out;
    char why[128];
    if (emx_cidr_list_parse(s->cfg->edge.trusted_proxies.items, s->cfg->edge.trusted_proxies.count,
                            &P->trusted, why, sizeof(why)) != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "edge.trusted_proxies: %s", why);
        rc = -EINVAL;
        goto out;
    }
    s->disc = emx_calloc(1, sizeof(*s->disc));
    if (!s->disc) {
        rc = -ENOMEM;
        goto out;
    }
    snprintf(s->disc->tag, sizeof(s->disc->tag), "discovery:%s.0", setup->discovery->hdr->name);
    host_init(s, &s->disc->host, s->disc->tag);
    s->disc->dp = s->dp;
    s->dhost_active = &s->disc->host;
    if (P->n > 1)
        emx_logf(&s->log, EMX_LOG_INFO, "server",
                 "%u worker loops, each with its own edge listener and pipes", P->n);
    emx_logf(&s->log, EMX_LOG_INFO, "server", "%s: edges on %s%s, boot %s", s->cfg->server.name,
             s->listen_addr, s->cfg->edge.path, s->boot_hex);

    struct emx_admin_ops aops = {
        .ctx = s, .ready = admin_ready, .handle = admin_handle, .agent_line = agent_line};
    rc = emx_admin_start(&s->loop, s->cfg->admin.listen, &aops, &s->log, &s->admin);
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot listen on admin %s (%s)",
                 s->cfg->admin.listen, uv_strerror(rc));
        rc = -EADDRINUSE;
        goto out_admin;
    }
    if (emx_admin_set_token(s->admin, setup->admin_token) != 0) {
        rc = -ENOMEM;
        goto out_admin;
    }
    s->actions_on = setup->admin_token != NULL;
    if (s->actions_on)
        emx_logf(&s->log, EMX_LOG_INFO, "admin", "admin actions on: token from %s",
                 s->cfg->admin.token_file);
    else
        emx_logf(&s->log, EMX_LOG_INFO, "admin",
                 "admin actions off (no admin.token_file): POST answers 403");
    status_event(s, EMX_EV_SERVER, "started: %s, edges on %s%s", s->cfg->server.name,
                 s->listen_addr, s->cfg->edge.path);
    if (s->cfg->admin.agent_listen && s->cfg->admin.agent_listen[0]) {
        rc = emx_agent_start(&s->loop, s->cfg->admin.agent_listen, &aops, &s->log, &s->agent);
        if (rc != 0) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot listen on agent %s (%s)",
                     s->cfg->admin.agent_listen, uv_strerror(rc));
            rc = -EADDRINUSE;
            goto out_admin;
        }
    }

    /* Every listening socket is open: give up root before any plugin reads
     * data from outside (discovery starts next). No worker thread runs
     * yet, so every thread the process will have runs as the user. */
    if (s->cfg->server.user) {
        char drop_err[300];
        rc = emx_drop_privileges(s->cfg->server.user, drop_err, sizeof(drop_err));
        if (rc != 0) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "%s", drop_err);
            goto out_admin;
        }
        emx_logf(&s->log, EMX_LOG_INFO, "server", "running as %s", s->cfg->server.user);
        warn_unreadable_after_drop(s);
    }

    /* One discovery instance for the process, on worker 0's loop; its sets
     * reach the other workers through their post queues. */
    rc = s->dp->create(&s->disc->host, setup->discovery_config, &s->dinst);
    if (rc == 0) {
        rc = s->dp->start(s->dinst);
        if (rc != 0)
            s->dp->destroy(s->dinst);
    }
    s->disc->dinst = s->dinst;
    if (rc != 0) {
        s->dinst = s->disc->dinst = NULL;
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "discovery %s failed to start (%s)",
                 setup->discovery->hdr->name, strerror(-rc));
        goto out_admin;
    }
    s->discovery_started = true;

    for (unsigned k = 0; k < P->n; k++)
        worker_start_timers(P->w[k]);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sighup, on_signal, SIGHUP);

    /* systemd (no-ops otherwise): ready once listening with discovery
     * started; the watchdog is fed from worker 0's loop, so a stuck loop
     * is seen. */
    rc = emx_notify_watchdog_start(&s->loop);
    if (rc != 0)
        emx_logf(&s->log, EMX_LOG_WARN, "server", "systemd watchdog timer: %s", uv_strerror(rc));
    char status[400];
    snprintf(status, sizeof(status), "%s: edges on %s%s", s->cfg->server.name, s->listen_addr,
             s->cfg->edge.path);
    emx_notify_ready(status);

    /* Signals go to worker 0's loop only (libuv forwards them there from
     * whichever thread the kernel picks). */
    for (unsigned k = 1; k < P->n; k++) {
        int err = pthread_create(&P->thread[k], NULL, worker_main, P->w[k]);
        if (err != 0) {
            emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot start worker %u (%s): stopping",
                     k, strerror(err));
            begin_shutdown(s, "worker start failure");
            break;
        }
        P->thread_started[k] = true;
    }
    /* Workers whose thread did not start never ran: they are freed as
     * after a failed start-up; worker 0's drain does not wait for them. */
    uv_run(&s->loop, UV_RUN_DEFAULT);
    rc = 0;
    for (unsigned k = 1; k < P->n; k++)
        if (P->thread_started[k])
            pthread_join(P->thread[k], NULL);
    goto out;

out_admin:
    emx_agent_stop(s->agent);
    s->agent = NULL;
    emx_admin_stop(s->admin);
    s->admin = NULL;
out:
    if (P->w[0]) {
        final_log = P->w[0]->log;
        final_log.worker = -1;
    }
    for (unsigned k = P->n; k-- > 0;)
        worker_free(P->w[k]);
    emx_cidr_list_free(&P->trusted);
    struct source_count *sc, *sctmp;
    HASH_ITER(hh, P->sources, sc, sctmp)
    {
        HASH_DEL(P->sources, sc);
        free(sc);
    }
    pthread_mutex_destroy(&P->src_mu);
    emx_relay_device_set_free(&P->devices); /* empty: the workers' relays are gone */
    pthread_cond_destroy(&P->cond);
    pthread_mutex_destroy(&P->mu);
    emx_free(P);
    if (rc == 0)
        emx_logf(&final_log, EMX_LOG_INFO, "server", "stopped");
    return rc;
}
