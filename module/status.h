/* The status page (GET / and /status on the admin port) and what only it
 * keeps: a bounded ring of recent events and a request-rate sample per
 * platform instance. HTML rendered here from the router's state and the
 * server's counters, the same data /instances and /metrics read, so their
 * numbers agree at any one moment. Every string that came from outside
 * (instance ids, hosts, Thing names, addresses, reasons) goes through
 * emx_textbuf_html. No sockets and no clock: the server passes the loop
 * time and the wall clock, so unit tests drive it directly. */
#ifndef EMX_STATUS_H
#define EMX_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ops.h"
#include "router.h"
#include "textbuf.h"

#define EMX_EVENTS_MAX     64
#define EMX_EVENT_TEXT_MAX 200

enum emx_event_kind {
    EMX_EV_ALL_DOWN = 0, /* no pipe connected, and back */
    EMX_EV_INSTANCE,     /* an instance up or down */
    EMX_EV_DISCOVERY,    /* instances added, leaving, removed; source failures */
    EMX_EV_RELOAD,       /* SIGHUP, ok or refused */
    EMX_EV_PIN,          /* multipart requests whose pinned pipe was lost */
    EMX_EV_PIPE_AUTH,    /* pipe AUTHs refused by a platform */
    EMX_EV_ADMIN,        /* actions through the admin API */
    EMX_EV_SERVER,       /* start, drain */
    EMX_EV__COUNT
};

struct emx_event {
    enum emx_event_kind kind;
    uint64_t count;        /* the same event back to back is one entry */
    uint64_t at_ms;        /* loop time of the latest */
    int64_t wall_ms;       /* wall clock (Unix ms) of the latest */
    int64_t first_wall_ms; /* ... and of the first */
    char text[EMX_EVENT_TEXT_MAX];
};

struct emx_status_inst; /* per-instance sample, by serial */

/* Owned by the loop that runs the server; all of it bounded. */
struct emx_status {
    struct emx_event ring[EMX_EVENTS_MAX];
    size_t head;    /* next slot */
    size_t nevents; /* at most EMX_EVENTS_MAX */
    uint64_t events_total;
    struct emx_status_inst *insts;
    uint64_t gen;
    bool known;  /* the fields below hold a first reading */
    bool any_up; /* a pipe was connected at the last look */
    uint64_t all_down_closes, pin_lost, pipe_auth_failures;
};

/* One device address and its connections (edges by source). */
struct emx_status_source {
    const char *addr;
    uint32_t n;
};

struct emx_status_view {
    const struct emx_ops_view *ops;
    const char *server_name;
    const char *version;
    int64_t workers;
    uint32_t max_pending;                    /* edge.max_pending */
    int64_t wall_ms;                         /* now, Unix ms */
    bool actions_on;                         /* admin.token_file is set */
    const struct emx_status_source *sources; /* the largest first, at most 10 */
    size_t nsources;
    size_t sources_total; /* distinct addresses */
    /* A pipe's last failure and its loop time; NULL when none. */
    const char *(*pipe_error)(void *ctx, const struct emx_pipe *p, uint64_t *at_ms);
    void *ctx;
};

const char *emx_event_kind_name(enum emx_event_kind k);

void emx_status_init(struct emx_status *st);
void emx_status_free(struct emx_status *st);

/* Record an event; one equal to the newest (same kind and text) adds its
 * count to it instead. */
void emx_status_event(struct emx_status *st, enum emx_event_kind kind, uint64_t count, uint64_t now,
                      int64_t wall_ms, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* The i-th newest event (0: the newest), NULL past the end. */
const struct emx_event *emx_status_event_at(const struct emx_status *st, size_t i);

/* Look at the router and record what changed since the last look:
 * instances added, leaving, removed, up (a pipe connected) or down (none),
 * all pipes down and back, devices closed for it, multipart pins lost, pipe
 * AUTHs refused. Samples each instance's requests per second once a second.
 * Call it often (every tick) and after a discovery update. */
void emx_status_track(struct emx_status *st, struct emx_router *r, uint64_t now, int64_t wall_ms);
/* Requests per second of an instance at its last sample; false before one. */
bool emx_status_rate(const struct emx_status *st, const struct emx_instance *inst, double *out);

/* GET / and /status. */
void emx_status_html(struct emx_textbuf *b, struct emx_router *r, const struct emx_status *st,
                     const struct emx_status_view *v, uint64_t now);
/* The same over every worker loop (server.workers): rs[k] and sts[k] are
 * worker k's router and status. Instances are listed as worker 0 has them,
 * with every worker's pipes, requests, rates and pipe errors added by id;
 * devices and counters are every worker's (the newest devices of all
 * workers by connection time); the events are every worker's, newest
 * first, one row for an event several workers recorded. The
 * caller makes sure no router or status changes meanwhile (isolation). At
 * most EMX_STATUS_WORKERS_MAX. */
#define EMX_STATUS_WORKERS_MAX (1u << EMX_WORKER_BITS)
void emx_status_html_n(struct emx_textbuf *b, struct emx_router *const *rs,
                       const struct emx_status *const *sts, size_t nr,
                       const struct emx_status_view *v, uint64_t now);
/* GET /status.js: reloads the page's content every few seconds. */
extern const char emx_status_js[];
/* The answer code (0xA0 …) edgemux sends for an answer reason; 0 unknown. */
unsigned emx_answer_reason_code(enum emx_answer_reason r);

#endif
