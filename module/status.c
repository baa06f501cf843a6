#include "status.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <uthash.h>

#include "alloc.h"
#include "codec.h"
#include "tunnel_relay.h"

#define RATE_EVERY_MS 1000 /* requests per second: one sample a second */
#define NAMES_MAX     120  /* instance ids listed in one event's text */
#define EDGES_SHOWN   25   /* the newest devices listed on the page */
#define THINGS_SHOWN  5    /* Thing names shown per device */
#define INST_ID_KEEP  96   /* an instance id kept to name it once it is gone */

struct emx_status_inst {
    UT_hash_handle hh;
    uint64_t serial;
    uint64_t gen;
    uint64_t req_prev;
    uint64_t rate_at; /* loop time of req_prev */
    double rate;
    bool rate_known;
    bool up;
    bool draining;
    char id[INST_ID_KEEP];
};

static const char *const kind_names[EMX_EV__COUNT] = {
    [EMX_EV_ALL_DOWN] = "all-down",
    [EMX_EV_INSTANCE] = "instance",
    [EMX_EV_DISCOVERY] = "discovery",
    [EMX_EV_RELOAD] = "reload",
    [EMX_EV_PIN] = "pin",
    [EMX_EV_PIPE_AUTH] = "pipe-auth",
    [EMX_EV_ADMIN] = "admin",
    [EMX_EV_SERVER] = "server",
};

const char *emx_event_kind_name(enum emx_event_kind k)
{
    return (unsigned)k < EMX_EV__COUNT ? kind_names[k] : "event";
}

/* The AlwaysOn code of each of edgemux's own answers (router.h). A reason
 * added later without a row here shows no code. */
static const unsigned char answer_codes[EMX_ANS__COUNT] = {
    [EMX_ANS_NO_INSTANCE] = EMX_AO_INTERNAL_ERROR,
    [EMX_ANS_PIPE_LOST] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_TIMEOUT] = EMX_AO_GATEWAY_TIMEOUT,
    [EMX_ANS_TOO_LARGE] = EMX_AO_ENTITY_TOO_LARGE,
    [EMX_ANS_TOO_MANY_PENDING] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_BAD_REQUEST] = EMX_AO_BAD_REQUEST,
    [EMX_ANS_KEEP_ALIVE] = EMX_AO_SUCCESS,
    [EMX_ANS_PIN_LOST] = EMX_AO_INTERNAL_ERROR,
    [EMX_ANS_ENDPOINT_GONE] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_EDGE_TIMEOUT] = EMX_AO_GATEWAY_TIMEOUT,
    [EMX_ANS_EDGE_LEFT] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_RATE_LIMITED] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_TOO_MANY_THINGS] = EMX_AO_FORBIDDEN,
    [EMX_ANS_DRAINING] = EMX_AO_INTERNAL_ERROR,
    [EMX_ANS_PIPE_BUSY] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_BYTES_IN_FLIGHT] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_ANSWER_BACKLOG] = EMX_AO_SERVICE_UNAVAILABLE,
    [EMX_ANS_MEMORY_BUDGET] = EMX_AO_INTERNAL_ERROR,
    [EMX_ANS_TUNNEL_REFUSED] = EMX_AO_SERVICE_UNAVAILABLE,
};

unsigned emx_answer_reason_code(enum emx_answer_reason r)
{
    return (unsigned)r < EMX_ANS__COUNT ? answer_codes[r] : 0;
}

/* ---- events ---- */

void emx_status_init(struct emx_status *st)
{
    memset(st, 0, sizeof(*st));
}

void emx_status_free(struct emx_status *st)
{
    struct emx_status_inst *e, *tmp;
    HASH_ITER(hh, st->insts, e, tmp)
    {
        HASH_DEL(st->insts, e);
        emx_free(e);
    }
}

static struct emx_event *newest(struct emx_status *st)
{
    if (st->nevents == 0)
        return NULL;
    return &st->ring[(st->head + EMX_EVENTS_MAX - 1) % EMX_EVENTS_MAX];
}

void emx_status_event(struct emx_status *st, enum emx_event_kind kind, uint64_t count, uint64_t now,
                      int64_t wall_ms, const char *fmt, ...)
{
    char text[EMX_EVENT_TEXT_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(text)) /* cut: say so, on a character boundary */
        memcpy(text + sizeof(text) - 4, "...", 4);
    struct emx_event *last = newest(st);
    if (last && last->kind == kind && strcmp(last->text, text) == 0) {
        last->count += count;
        last->at_ms = now;
        last->wall_ms = wall_ms;
        return;
    }
    struct emx_event *ev = &st->ring[st->head];
    st->head = (st->head + 1) % EMX_EVENTS_MAX;
    if (st->nevents < EMX_EVENTS_MAX)
        st->nevents++;
    st->events_total++;
    ev->kind = kind;
    ev->count = count;
    ev->at_ms = now;
    ev->wall_ms = ev->first_wall_ms = wall_ms;
    memcpy(ev->text, text, sizeof(text));
}

const struct emx_event *emx_status_event_at(const struct emx_status *st, size_t i)
{
    if (i >= st->nevents)
        return NULL;
    return &st->ring[(st->head + 2 * EMX_EVENTS_MAX - 1 - i) % EMX_EVENTS_MAX];
}

/* ---- tracking ---- */

/* Ids of instances that changed alike in one look, for one event. */
struct names {
    unsigned n;
    size_t len;
    char text[NAMES_MAX];
};

static void names_add(struct names *ns, const char *id)
{
    ns->n++;
    if (ns->len >= sizeof(ns->text) - 1)
        return;
    int w =
        snprintf(ns->text + ns->len, sizeof(ns->text) - ns->len, "%s%s", ns->n > 1 ? ", " : "", id);
    if (w < 0 || (size_t)w >= sizeof(ns->text) - ns->len) {
        /* ", ..." and its NUL end the text (5 characters would have
         * overwritten the NUL in the last byte) */
        memcpy(ns->text + sizeof(ns->text) - 6, ", ...", 6);
        ns->len = sizeof(ns->text) - 1;
    } else {
        ns->len += (size_t)w;
    }
}

static void names_event(struct emx_status *st, enum emx_event_kind kind, const struct names *ns,
                        const char *what, uint64_t now, int64_t wall)
{
    if (ns->n == 1)
        emx_status_event(st, kind, 1, now, wall, "instance %s %s", ns->text, what);
    else if (ns->n > 1)
        emx_status_event(st, kind, 1, now, wall, "%u instances %s: %s", ns->n, what, ns->text);
}

static void sample_rate(struct emx_status_inst *e, const struct emx_instance *inst, uint64_t now)
{
    if (now - e->rate_at < RATE_EVERY_MS)
        return;
    uint64_t dt = now - e->rate_at;
    e->rate = inst->requests >= e->req_prev
                  ? (double)(inst->requests - e->req_prev) * 1000.0 / (double)dt
                  : 0.0;
    e->rate_known = true;
    e->req_prev = inst->requests;
    e->rate_at = now;
}

void emx_status_track(struct emx_status *st, struct emx_router *r, uint64_t now, int64_t wall)
{
    struct names added = {0}, leaving = {0}, removed = {0}, up = {0}, down = {0};
    st->gen++;
    for (struct emx_instance *inst = emx_router_instance_next(r, NULL); inst;
         inst = emx_router_instance_next(r, inst)) {
        struct emx_status_inst *e;
        HASH_FIND(hh, st->insts, &inst->serial, sizeof(inst->serial), e);
        if (!e) {
            e = emx_calloc(1, sizeof(*e));
            if (!e)
                continue; /* seen at the next look */
            e->serial = inst->serial;
            e->req_prev = inst->requests;
            e->rate_at = now;
            snprintf(e->id, sizeof(e->id), "%s", inst->id);
            HASH_ADD(hh, st->insts, serial, sizeof(e->serial), e);
            if (inst->state == EMX_INSTANCE_ACTIVE)
                names_add(&added, inst->id);
        }
        e->gen = st->gen;
        bool is_up = inst->up_pipes > 0;
        if (is_up != e->up) {
            names_add(is_up ? &up : &down, inst->id);
            e->up = is_up;
        }
        if (inst->state == EMX_INSTANCE_DRAINING && !e->draining) {
            e->draining = true;
            names_add(&leaving, inst->id);
        }
        sample_rate(e, inst, now);
    }
    struct emx_status_inst *e, *tmp;
    HASH_ITER(hh, st->insts, e, tmp)
    {
        if (e->gen == st->gen)
            continue;
        names_add(&removed, e->id);
        HASH_DEL(st->insts, e);
        emx_free(e);
    }
    names_event(st, EMX_EV_DISCOVERY, &added, "added", now, wall);
    names_event(st, EMX_EV_DISCOVERY, &leaving, "left discovery: draining", now, wall);
    names_event(st, EMX_EV_DISCOVERY, &removed, "drained and removed", now, wall);
    names_event(st, EMX_EV_INSTANCE, &up, "up (a pipe connected)", now, wall);
    names_event(st, EMX_EV_INSTANCE, &down, "down (no pipe connected)", now, wall);

    const struct emx_router_stats *rs = emx_router_stats(r);
    bool any = emx_router_pipes_up(r) > 0;
    uint64_t pin = rs->answers[EMX_ANS_PIN_LOST];
    if (st->known) {
        if (st->any_up && !any)
            emx_status_event(st, EMX_EV_ALL_DOWN, 1, now, wall,
                             "no platform pipe connected: all instances down (devices are "
                             "closed 1013 after platform.all_down_grace)");
        else if (!st->any_up && any)
            emx_status_event(st, EMX_EV_ALL_DOWN, 1, now, wall,
                             "a platform pipe is connected: serving");
        if (rs->all_down_closes > st->all_down_closes)
            emx_status_event(st, EMX_EV_ALL_DOWN, rs->all_down_closes - st->all_down_closes, now,
                             wall, "devices closed 1013: no platform instance");
        if (pin > st->pin_lost)
            emx_status_event(st, EMX_EV_PIN, pin - st->pin_lost, now, wall,
                             "multipart requests answered 0xA0: their pinned pipe was lost or "
                             "stayed busy");
        if (rs->pipe_auth_failures > st->pipe_auth_failures)
            emx_status_event(st, EMX_EV_PIPE_AUTH, rs->pipe_auth_failures - st->pipe_auth_failures,
                             now, wall, "pipe AUTH refused by a platform (check the app key)");
    }
    st->known = true;
    st->any_up = any;
    st->all_down_closes = rs->all_down_closes;
    st->pin_lost = pin;
    st->pipe_auth_failures = rs->pipe_auth_failures;
}

bool emx_status_rate(const struct emx_status *st, const struct emx_instance *inst, double *out)
{
    struct emx_status_inst *e;
    HASH_FIND(hh, st->insts, &inst->serial, sizeof(inst->serial), e);
    if (!e || !e->rate_known)
        return false;
    *out = e->rate;
    return true;
}

/* ---- the page ---- */

static void html(struct emx_textbuf *b, const char *s)
{
    emx_textbuf_html(b, s);
}

static void ago(struct emx_textbuf *b, uint64_t now, uint64_t at)
{
    uint64_t s = now >= at ? (now - at) / 1000 : 0;
    if (s < 120)
        emx_textbuf_printf(b, "%" PRIu64 " s ago", s);
    else if (s < 7200)
        emx_textbuf_printf(b, "%" PRIu64 " min ago", s / 60);
    else
        emx_textbuf_printf(b, "%" PRIu64 " h ago", s / 3600);
}

static void wall_time(struct emx_textbuf *b, int64_t wall_ms)
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;
    char out[32];
    if (!gmtime_r(&t, &tm) || strftime(out, sizeof(out), "%Y-%m-%d %H:%M:%SZ", &tm) == 0) {
        emx_textbuf_puts(b, "?");
        return;
    }
    emx_textbuf_puts(b, out);
}

static void duration(struct emx_textbuf *b, uint64_t s)
{
    if (s >= 86400)
        emx_textbuf_printf(b, "%" PRIu64 " d %" PRIu64 " h", s / 86400, s % 86400 / 3600);
    else if (s >= 3600)
        emx_textbuf_printf(b, "%" PRIu64 " h %" PRIu64 " min", s / 3600, s % 3600 / 60);
    else if (s >= 60)
        emx_textbuf_printf(b, "%" PRIu64 " min %" PRIu64 " s", s / 60, s % 60);
    else
        emx_textbuf_printf(b, "%" PRIu64 " s", s);
}

/* A labelled number; id for tests and scripts to find it. */
static void kv(struct emx_textbuf *b, const char *id, const char *label, uint64_t v)
{
    emx_textbuf_printf(
        b,
        "<div class=\"kv\"><span class=\"k\">%s</span> <span class=\"v\" id=\"%s\">%" PRIu64
        "</span></div>\n",
        label, id, v);
}

/* An instance as the whole process has it: worker 0's instance and the
 * same one in every other worker (emx_ops_instance_in), added up. */
struct inst_sum {
    unsigned up, npipes, writable;
    uint64_t queued, pending, requests;
    bool eligible;
    bool rate_known;
    double rate;
    const char *err; /* the latest failure of any of its pipes */
    uint64_t err_at;
};

static void inst_sum(struct inst_sum *is, struct emx_router *const *rs,
                     const struct emx_status *const *sts, size_t nr, struct emx_instance *inst,
                     const struct emx_status_view *v, uint64_t now)
{
    memset(is, 0, sizeof(*is));
    for (size_t k = 0; k < nr; k++) {
        struct emx_instance *o = k == 0 ? inst : emx_ops_instance_in(rs[k], inst);
        if (!o)
            continue;
        is->up += o->up_pipes;
        is->npipes += o->npipes;
        is->pending += o->pending;
        is->requests += o->requests;
        is->eligible = is->eligible || emx_instance_is_eligible(rs[k], o, now);
        double rate;
        if (sts[k] && emx_status_rate(sts[k], o, &rate)) {
            is->rate += rate;
            is->rate_known = true;
        }
        for (unsigned i = 0; i < o->npipes; i++) {
            const struct emx_pipe *p = &o->pipes[i];
            is->writable += emx_pipe_is_writable(rs[k], p, now);
            is->queued += p->wm.queued;
            uint64_t at = 0;
            const char *e = v->pipe_error ? v->pipe_error(v->ctx, p, &at) : NULL;
            if (e && (!is->err || at > is->err_at)) {
                is->err = e;
                is->err_at = at;
            }
        }
    }
}

static const char *instance_word(const struct emx_instance *inst, const struct inst_sum *is)
{
    if (is->up == 0)
        return "down";
    if (inst->state == EMX_INSTANCE_DRAINING)
        return "draining";
    if (inst->maintenance)
        return "maintenance";
    if (!is->eligible)
        return "unwritable";
    if (is->up < is->npipes)
        return "degraded";
    return "up";
}

static const char page_head[] =
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    "<meta name=\"referrer\" content=\"no-referrer\">\n"
    "<style>\n"
    "body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}\n"
    "h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}\n"
    "table{border-collapse:collapse;background:#fff}\n"
    "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}\n"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\n"
    ".kv{display:inline-block;margin:0 1.5em .3em 0}.k{color:#666}.v{font-weight:600}\n"
    ".s-up{color:#070}.s-down{color:#b00;font-weight:700}.s-degraded,.s-unwritable{color:#a60}\n"
    ".s-maintenance,.s-draining{color:#06a}.muted{color:#777}.err{color:#b00}\n"
    "code{font-size:.95em}\n"
    "</style>\n";

static void page_process(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                         const struct emx_router_stats *rs_sum, const struct emx_status_view *v,
                         uint64_t now)
{
    const struct emx_ops_view *o = v->ops;
    uint64_t up_s = now >= o->start_ms ? (now - o->start_ms) / 1000 : 0;
    emx_textbuf_puts(b, "<section id=\"process\">\n<p>version <span id=\"version\">");
    html(b, v->version);
    emx_textbuf_printf(
        b, "</span> &middot; uptime <span id=\"uptime\" data-seconds=\"%" PRIu64 "\">", up_s);
    duration(b, up_s);
    emx_textbuf_printf(b, "</span> &middot; worker(s) <span id=\"workers\">%" PRId64 "</span>",
                       v->workers);
    emx_textbuf_puts(b, " &middot; discovery <span id=\"discovery\">");
    html(b, o->discovery_plugin);
    emx_textbuf_printf(b, "</span> &middot; <span id=\"ready\" class=\"%s\">%s</span>",
                       o->ready ? "s-up" : "s-down", o->ready ? "ready" : "not ready");
    if (o->draining)
        emx_textbuf_puts(b, " &middot; <span id=\"draining\" class=\"s-draining\">draining</span>");
    emx_textbuf_printf(b, " &middot; agent weight <span id=\"agent-weight\">%u</span>%%",
                       o->agent_weight);
    emx_textbuf_printf(b, " &middot; admin actions <span id=\"actions\">%s</span></p>\n",
                       v->actions_on ? "on (token)" : "off");
    const struct emx_server_counters *c = o->counters;
    uint64_t pipes_up = 0;
    for (size_t k = 0; k < nr; k++)
        pipes_up += emx_router_pipes_up(rs[k]);
    kv(b, "pipes-connected", "pipes connected", pipes_up);
    kv(b, "reloads-ok", "reloads", c ? c->reloads_ok : 0);
    kv(b, "reloads-failed", "reloads refused", c ? c->reloads_failed : 0);
    kv(b, "discovery-updates", "discovery updates", rs_sum->discovery_updates);
    kv(b, "discovery-failures", "discovery failures", rs_sum->discovery_failures);
    if (nr > 1) {
        /* each worker loop's share: a worker without pipes closes its own
         * devices after platform.all_down_grace */
        emx_textbuf_puts(b, "<table id=\"worker-loops\">\n<thead><tr><th>worker</th>"
                            "<th class=\"n\">devices</th><th class=\"n\">pipes connected</th>"
                            "<th class=\"n\">accepted in all</th></tr></thead>\n<tbody>\n");
        for (size_t k = 0; k < nr; k++)
            emx_textbuf_printf(b,
                               "<tr class=\"worker\" data-worker=\"%zu\"><td>%zu</td>"
                               "<td class=\"n edges\">%zu</td><td class=\"n pipes\">%u</td>"
                               "<td class=\"n accepted\">%" PRIu64 "</td></tr>\n",
                               k, k, emx_router_edge_count(rs[k]), emx_router_pipes_up(rs[k]),
                               emx_router_stats(rs[k])->edges_opened);
        emx_textbuf_puts(b, "</tbody>\n</table>\n");
    }
    emx_textbuf_puts(b, "</section>\n");
}

static void page_instances(struct emx_textbuf *b, struct emx_router *const *rs,
                           const struct emx_status *const *sts, size_t nr,
                           const struct emx_status_view *v, uint64_t now)
{
    emx_textbuf_puts(
        b, "<section>\n<h2>Platform instances</h2>\n<table id=\"instances\">\n<thead><tr>"
           "<th>instance</th><th>address</th><th>state</th><th class=\"n\">pipes up</th>"
           "<th class=\"n\">writable</th><th class=\"n\">queued bytes</th>"
           "<th class=\"n\">pending</th><th class=\"n\">requests</th><th class=\"n\">req/s</th>"
           "<th>last error</th></tr></thead>\n<tbody>\n");
    double total_rate = 0;
    size_t n = 0;
    struct emx_router *r = rs[0];
    for (struct emx_instance *inst = emx_router_instance_next(r, NULL); inst;
         inst = emx_router_instance_next(r, inst)) {
        n++;
        struct inst_sum is;
        inst_sum(&is, rs, sts, nr, inst, v, now);
        const char *word = instance_word(inst, &is);
        emx_textbuf_puts(b, "<tr class=\"instance\" data-instance=\"");
        html(b, inst->id);
        emx_textbuf_printf(b, "\" data-state=\"%s\"><td class=\"id\">", word);
        html(b, inst->id);
        emx_textbuf_puts(b, "</td><td class=\"address\">");
        html(b, inst->host);
        emx_textbuf_printf(b, ":%u%s</td>", inst->port, inst->tls ? " (tls)" : "");
        emx_textbuf_printf(b, "<td class=\"state s-%s\">%s</td>", word, word);
        emx_textbuf_printf(b,
                           "<td class=\"n pipes-up\">%u</td><td class=\"n writable\">%u</td>"
                           "<td class=\"n queued\">%" PRIu64 "</td><td class=\"n pending\">%" PRIu64
                           "</td><td class=\"n requests\">%" PRIu64 "</td>",
                           is.up, is.writable, is.queued, is.pending, is.requests);
        if (is.rate_known) {
            total_rate += is.rate;
            emx_textbuf_printf(b, "<td class=\"n rate\">%.1f</td>", is.rate);
        } else {
            emx_textbuf_puts(b, "<td class=\"n rate muted\">-</td>");
        }
        emx_textbuf_puts(b, "<td class=\"last-error\">");
        if (is.err) {
            emx_textbuf_puts(b, "<span class=\"err\">");
            html(b, is.err);
            emx_textbuf_puts(b, "</span> <span class=\"muted\">");
            ago(b, now, is.err_at);
            emx_textbuf_puts(b, "</span>");
        }
        emx_textbuf_printf(b, "</td></tr>\n");
    }
    if (n == 0)
        emx_textbuf_puts(b, "<tr><td colspan=\"10\" class=\"muted\">no instance: discovery has "
                            "reported none yet</td></tr>\n");
    emx_textbuf_printf(b,
                       "</tbody>\n</table>\n<p><span id=\"instance-count\">%zu</span> instance(s), "
                       "<span id=\"request-rate\">%.1f</span> requests/s in all (sampled each "
                       "second)%s.</p>\n</section>\n",
                       n, total_rate,
                       nr > 1 ? "; pipes, requests and rates add up every worker's" : "");
}

static void page_answers(struct emx_textbuf *b, const struct emx_router_stats *rs)
{
    uint64_t by_code[256] = {0};
    emx_textbuf_puts(b, "<section>\n<h2>Answers edgemux gave itself</h2>\n"
                        "<table id=\"answers\">\n<thead><tr><th>reason</th><th>code</th>"
                        "<th class=\"n\">answers</th></tr></thead>\n<tbody>\n");
    for (unsigned i = 0; i < EMX_ANS__COUNT; i++) {
        unsigned code = emx_answer_reason_code((enum emx_answer_reason)i);
        const char *name = emx_answer_reason_name((enum emx_answer_reason)i);
        by_code[code & 0xff] += rs->answers[i];
        emx_textbuf_puts(b, "<tr class=\"answer\" data-reason=\"");
        html(b, name);
        emx_textbuf_puts(b, "\"><td>");
        html(b, name);
        if (code)
            emx_textbuf_printf(b, "</td><td>0x%02X</td>", code);
        else
            emx_textbuf_puts(b, "</td><td class=\"muted\">-</td>");
        emx_textbuf_printf(b, "<td class=\"n count\">%" PRIu64 "</td></tr>\n", rs->answers[i]);
    }
    emx_textbuf_puts(b, "</tbody>\n</table>\n<p id=\"answers-by-code\">by code:");
    bool any = false;
    for (unsigned code = 1; code < 256; code++)
        if (by_code[code]) {
            emx_textbuf_printf(
                b, " <span class=\"code\" data-code=\"0x%02X\">0x%02X: %" PRIu64 "</span>", code,
                code, by_code[code]);
            any = true;
        }
    emx_textbuf_printf(b, "%s</p>\n</section>\n", any ? "" : " none");
}

/* Remote Access: records of StartTunnels forwarded, the sockets relayed now
 * and the bytes so far (open tunnels' too); each socket is on /tunnels. */
static void page_tunnels(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                         const struct emx_status_view *v)
{
    const struct emx_relays *rl = v->ops->relays;
    uint64_t records = 0, refused = 0;
    for (size_t k = 0; k < nr; k++)
        records += emx_router_tunnel_count(rs[k]);
    if (rl)
        for (unsigned i = 0; i < EMX_RELAY_REFUSE__COUNT; i++)
            refused += rl->st.refused[i];
    emx_textbuf_puts(b, "<section id=\"tunnels\">\n<h2>Remote Access tunnels</h2>\n");
    kv(b, "tunnel-records", "StartTunnels recorded", records);
    kv(b, "tunnel-device-sockets", "device sockets relayed",
       rl ? rl->nopen[EMX_RELAY_SIDE_SERVER] : 0);
    kv(b, "tunnel-client-sockets", "client sockets relayed",
       rl ? rl->nopen[EMX_RELAY_SIDE_CLIENT] : 0);
    kv(b, "tunnel-bytes-to-owner", "bytes to owners", rl ? rl->st.bytes_to_owner : 0);
    kv(b, "tunnel-bytes-to-peer", "bytes to devices and clients", rl ? rl->st.bytes_to_peer : 0);
    kv(b, "tunnel-sockets-refused", "sockets refused", refused);
    emx_textbuf_puts(b, "</section>\n");
}

static void edge_row(struct emx_textbuf *b, const struct emx_edge *e, uint64_t now)
{
    emx_textbuf_printf(b,
                       "<tr class=\"edge\" data-endpoint=\"%08" PRIx32 "\"><td><code>%08" PRIx32
                       "</code></td><td class=\"address\">",
                       e->id, e->id);
    html(b, e->addr);
    emx_textbuf_printf(b, "</td><td>%s</td><td class=\"n\">", emx_edge_state_name(e->state));
    duration(b, now >= e->opened_at ? (now - e->opened_at) / 1000 : 0);
    emx_textbuf_printf(b, "</td><td class=\"n pending\">%" PRIu32 "</td><td class=\"things\">",
                       e->npending);
    const void *cur = NULL;
    const char *name;
    unsigned shown = 0;
    while (shown < THINGS_SHOWN && (name = emx_edge_thing_next(e, &cur)) != NULL) {
        emx_textbuf_puts(b, shown ? ", <span class=\"thing\">" : "<span class=\"thing\">");
        html(b, name);
        emx_textbuf_puts(b, "</span>");
        shown++;
    }
    if (e->nthings > shown)
        emx_textbuf_printf(b, " <span class=\"muted\">and %" PRIu32 " more</span>",
                           e->nthings - shown);
    emx_textbuf_puts(b, "</td></tr>\n");
}

/* The newest EDGES_SHOWN edges of one router, in a ring. */
struct edge_ring {
    const struct emx_edge *e[EDGES_SHOWN];
    size_t n, idx; /* how many; next slot */
};

static const struct emx_edge *ring_newest(const struct edge_ring *g, size_t taken)
{
    if (taken >= g->n)
        return NULL;
    return g->e[(g->idx + 2 * EDGES_SHOWN - 1 - taken) % EDGES_SHOWN];
}

static void page_edges(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                       const struct emx_router_stats *rs_sum, const struct emx_status_view *v,
                       uint64_t now)
{
    struct edge_ring rings[EMX_STATUS_WORKERS_MAX];
    uint64_t authed = 0, pending = 0, inbound = 0;
    size_t connected = 0;
    for (size_t k = 0; k < nr; k++) {
        struct edge_ring *g = &rings[k];
        g->n = g->idx = 0;
        connected += emx_router_edge_count(rs[k]);
        for (struct emx_edge *e = emx_router_edge_next(rs[k], NULL); e;
             e = emx_router_edge_next(rs[k], e)) {
            authed += e->state == EMX_EDGE_AUTHED;
            pending += e->npending;
            inbound += e->ninbound;
            g->e[g->idx] = e; /* a router lists its edges oldest first */
            g->idx = (g->idx + 1) % EDGES_SHOWN;
            if (g->n < EDGES_SHOWN)
                g->n++;
        }
    }
    /* the newest of all workers: their newest merged by connection time */
    const struct emx_edge *last[EDGES_SHOWN];
    size_t nlast = 0, taken[EMX_STATUS_WORKERS_MAX] = {0};
    while (nlast < EDGES_SHOWN) {
        size_t best = nr;
        const struct emx_edge *be = NULL;
        for (size_t k = 0; k < nr; k++) {
            const struct emx_edge *e = ring_newest(&rings[k], taken[k]);
            if (e && (!be || e->opened_at > be->opened_at)) {
                be = e;
                best = k;
            }
        }
        if (!be)
            break;
        taken[best]++;
        last[nlast++] = be;
    }
    emx_textbuf_puts(b, "<section>\n<h2>Edges (devices)</h2>\n<div id=\"edge-summary\">\n");
    kv(b, "edges-connected", "connected", connected);
    kv(b, "edges-authenticated", "authenticated", authed);
    kv(b, "edges-pending", "requests pending (device to platform)", pending);
    kv(b, "edges-inbound", "platform requests pending (to devices)", inbound);
    kv(b, "edges-accepted", "accepted in all", rs_sum->edges_opened);
    kv(b, "edges-closed", "closed in all", rs_sum->edges_closed);
    emx_textbuf_printf(b,
                       "<div class=\"kv\"><span class=\"k\">edge.max_pending</span> "
                       "<span class=\"v\">%" PRIu32 "</span></div>\n</div>\n",
                       v->max_pending);

    emx_textbuf_printf(b,
                       "<h3>By source (top %zu of <span id=\"source-count\">%zu</span>)</h3>\n"
                       "<table id=\"sources\">\n<thead><tr><th>address</th><th class=\"n\">"
                       "connections</th></tr></thead>\n<tbody>\n",
                       v->nsources, v->sources_total);
    for (size_t i = 0; i < v->nsources; i++) {
        emx_textbuf_puts(b, "<tr class=\"source\"><td>");
        html(b, v->sources[i].addr);
        emx_textbuf_printf(b, "</td><td class=\"n\">%" PRIu32 "</td></tr>\n", v->sources[i].n);
    }
    emx_textbuf_puts(b, "</tbody>\n</table>\n");

    emx_textbuf_printf(b,
                       "<h3>Newest %zu of %zu</h3>\n<table id=\"edges\">\n<thead><tr>"
                       "<th>endpoint</th><th>address</th><th>state</th><th class=\"n\">"
                       "connected</th><th class=\"n\">pending</th><th>Things</th></tr></thead>\n"
                       "<tbody>\n",
                       nlast, connected);
    for (size_t k = 0; k < nlast; k++) /* newest first */
        edge_row(b, last[k], now);
    emx_textbuf_puts(b, "</tbody>\n</table>\n<p class=\"muted\">All of them: <a "
                        "href=\"/edges\">/edges</a> (<code>?thing=NAME</code>, "
                        "<code>?endpoint=ID</code>).</p>\n</section>\n");
}

/* Two workers saw the same event when kind and text match within this
 * much wall time (a discovery set reaches every worker within it). */
#define EVENT_SAME_WITHIN_MS 5000

/* Does this worker's ring hold ev (the same event, seen there too)? */
static bool event_seen_by(const struct emx_status *st, const struct emx_event *ev)
{
    const struct emx_event *o;
    for (size_t i = 0; (o = emx_status_event_at(st, i)) != NULL; i++) {
        int64_t d = o->wall_ms - ev->wall_ms;
        if (o->kind == ev->kind && d <= EVENT_SAME_WITHIN_MS && d >= -EVENT_SAME_WITHIN_MS &&
            strcmp(o->text, ev->text) == 0)
            return true;
    }
    return false;
}

static void event_row(struct emx_textbuf *b, const struct emx_event *ev, uint64_t now,
                      const char *workers)
{
    emx_textbuf_printf(b, "<tr class=\"event\" data-kind=\"%s\"", emx_event_kind_name(ev->kind));
    if (workers)
        emx_textbuf_printf(b, " data-workers=\"%s\"", workers);
    emx_textbuf_puts(b, "><td>");
    wall_time(b, ev->wall_ms);
    emx_textbuf_puts(b, "</td><td class=\"muted\">");
    ago(b, now, ev->at_ms);
    emx_textbuf_printf(b, "</td><td>%s</td>", emx_event_kind_name(ev->kind));
    if (workers)
        emx_textbuf_printf(b, "<td class=\"workers\">%s</td>", workers);
    emx_textbuf_puts(b, "<td class=\"text\">");
    html(b, ev->text);
    emx_textbuf_printf(b, "</td><td class=\"n\">%" PRIu64, ev->count);
    if (ev->count > 1 && ev->first_wall_ms != ev->wall_ms) {
        emx_textbuf_puts(b, " <span class=\"muted\">since ");
        wall_time(b, ev->first_wall_ms);
        emx_textbuf_puts(b, "</span>");
    }
    emx_textbuf_puts(b, "</td></tr>\n");
}

/* The newest events of every worker, newest first. An event more than one
 * worker recorded (an instance added, a reload) is one row naming the
 * workers that saw it ("all" when each did); one only some workers saw
 * (their pipes went down) names those. One worker: its events as they are. */
static void page_events(struct emx_textbuf *b, const struct emx_status *const *sts, size_t nr,
                        uint64_t now)
{
    bool multi = nr > 1;
    emx_textbuf_printf(b,
                       "<section>\n<h2>Last events</h2>\n<table id=\"events\">\n<thead><tr>"
                       "<th>time (UTC)</th><th>when</th><th>kind</th>%s<th>what</th>"
                       "<th class=\"n\">times</th></tr></thead>\n<tbody>\n",
                       multi ? "<th>workers</th>" : "");
    size_t at[EMX_STATUS_WORKERS_MAX] = {0}, rows = 0;
    uint64_t total = 0;
    for (size_t k = 0; k < nr; k++)
        total += sts[k]->events_total;
    while (rows < EMX_EVENTS_MAX) {
        /* the newest event not shown yet, over the workers */
        const struct emx_event *ev = NULL;
        size_t from = 0;
        for (size_t k = 0; k < nr; k++) {
            const struct emx_event *e = emx_status_event_at(sts[k], at[k]);
            if (e && (!ev || e->wall_ms > ev->wall_ms)) {
                ev = e;
                from = k;
            }
        }
        if (!ev)
            break;
        at[from]++;
        if (!multi) {
            event_row(b, ev, now, NULL);
            rows++;
            continue;
        }
        /* shown already from a worker that saw it too */
        bool shown = false;
        for (size_t k = 0; k < from && !shown; k++)
            shown = event_seen_by(sts[k], ev);
        if (shown)
            continue;
        char workers[64] = "";
        size_t len = 0, seen = 0;
        for (size_t k = 0; k < nr; k++)
            if (k == from || event_seen_by(sts[k], ev)) {
                seen++;
                int w = snprintf(workers + len, sizeof(workers) - len, "%s%zu", len ? " " : "", k);
                if (w > 0 && (size_t)w < sizeof(workers) - len)
                    len += (size_t)w;
            }
        event_row(b, ev, now, seen == nr ? "all" : workers);
        rows++;
    }
    if (rows == 0)
        emx_textbuf_printf(b, "<tr><td colspan=\"%d\" class=\"muted\">none yet</td></tr>\n",
                           multi ? 6 : 5);
    emx_textbuf_printf(b,
                       "</tbody>\n</table>\n<p class=\"muted\">The last %d%s are kept; %" PRIu64
                       " in all since the start%s.</p>\n</section>\n",
                       EMX_EVENTS_MAX, multi ? " of each worker" : "", total,
                       multi ? ", counted by every worker that saw them" : "");
}

void emx_status_html(struct emx_textbuf *b, struct emx_router *r, const struct emx_status *st,
                     const struct emx_status_view *v, uint64_t now)
{
    emx_status_html_n(b, &r, &st, 1, v, now);
}

void emx_status_html_n(struct emx_textbuf *b, struct emx_router *const *rs,
                       const struct emx_status *const *sts, size_t nr,
                       const struct emx_status_view *v, uint64_t now)
{
    if (nr > EMX_STATUS_WORKERS_MAX)
        nr = EMX_STATUS_WORKERS_MAX;
    struct emx_router_stats sum;
    emx_ops_stats_sum(rs, nr, &sum);
    emx_textbuf_puts(b, page_head);
    emx_textbuf_puts(b, "<title>edgemux ");
    html(b, v->server_name);
    emx_textbuf_puts(b, "</title>\n</head>\n<body>\n<main id=\"status\">\n<h1>edgemux <span "
                        "id=\"server-name\">");
    html(b, v->server_name);
    emx_textbuf_puts(b, "</span></h1>\n<p class=\"muted\">as of <span id=\"generated\">");
    wall_time(b, v->wall_ms);
    emx_textbuf_puts(b,
                     "</span> &middot; <span id=\"live\">a snapshot: reload the page to update "
                     "it</span> &middot; JSON and metrics: <a href=\"/instances\">/instances</a> "
                     "<a href=\"/edges\">/edges</a> <a href=\"/tunnels\">/tunnels</a> "
                     "<a href=\"/metrics\">/metrics</a></p>\n");
    page_process(b, rs, nr, &sum, v, now);
    page_instances(b, rs, sts, nr, v, now);
    page_edges(b, rs, nr, &sum, v, now);
    page_answers(b, &sum);
    page_tunnels(b, rs, nr, v);
    page_events(b, sts, nr, now);
    emx_textbuf_puts(b, "</main>\n<script src=\"/status.js\"></script>\n</body>\n</html>\n");
}

/* Loaded from the page (the admin answers it with a Content-Security-Policy
 * allowing scripts from itself only, none inline): every few seconds it
 * fetches the page again and swaps in its content. Without JavaScript the
 * page is a snapshot. */
const char emx_status_js[] =
    "(function () {\n"
    "  'use strict';\n"
    "  var every = 5000, runs = 0;\n"
    "  function say(text) {\n"
    "    var live = document.getElementById('live');\n"
    "    if (live) live.textContent = text;\n"
    "  }\n"
    "  function refresh() {\n"
    "    fetch(window.location.pathname, {cache: 'no-store', credentials: 'same-origin'})\n"
    "      .then(function (r) {\n"
    "        if (!r.ok) throw new Error('HTTP ' + r.status);\n"
    "        return r.text();\n"
    "      })\n"
    "      .then(function (text) {\n"
    "        var doc = new DOMParser().parseFromString(text, 'text/html');\n"
    "        var next = doc.getElementById('status');\n"
    "        var cur = document.getElementById('status');\n"
    "        if (!next || !cur) throw new Error('unexpected page');\n"
    "        cur.replaceWith(document.adoptNode(next));\n"
    "        runs++;\n"
    "        document.documentElement.setAttribute('data-refreshed', String(runs));\n"
    "        say('live: refreshed every ' + every / 1000 + ' s');\n"
    "      })\n"
    "      .catch(function (err) {\n"
    "        say('not refreshed (' + err.message + '); retrying every ' + every / 1000 + ' s');\n"
    "      })\n"
    "      .then(function () { window.setTimeout(refresh, every); });\n"
    "  }\n"
    "  say('live: refreshed every ' + every / 1000 + ' s');\n"
    "  window.setTimeout(refresh, every);\n"
    "})();\n";
